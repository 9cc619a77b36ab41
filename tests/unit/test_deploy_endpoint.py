"""The defended endpoint over real HTTP: a reference model server upstream, the endpoint in front.

Every answer through the endpoint must equal ``M ∘ API ∘ T`` computed directly, in the
upstream's own protocol and answer kind; failures must be the HTTP statuses a client
of a model server expects.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save_file

from auditor.blackbox import ApiConfig, HttpModelAPI, ModelServer
from auditor.blackbox.defended import transform_images
from auditor.deploy import DefendedEndpoint, EndpointLimits, load_defense
from auditor.errors import AuditError
from auditor.models import UNet, UNetConfig
from auditor.refine import RefineConfig, derangement

LOOPBACK = ("127.0.0.1",)
CPU = torch.device("cpu")


def write_defense(folder: Path, transform: UNet, mapping: torch.Tensor, api: dict | None, image_shape=(1, 16, 16)) -> Path:
    """The three files an API audit leaves, as the pipeline writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    config = RefineConfig(unet=transform.config)
    meta = {"mapping": mapping.tolist(), "refine_config": config.to_dict(), "seed": 0}
    save_file({k: v.contiguous() for k, v in transform.state_dict().items()}, str(folder / "transform.safetensors"),
              metadata={"refine": json.dumps(meta)})
    (folder / "defense.json").write_text(json.dumps(meta))
    spec_model = {"source": "api", "api": api} if api else {"source": "checkpoint", "api": None}
    report = {"audit_id": "test-audit", "spec": {"model": spec_model},
              "inputs": {"data": {"image_shape": list(image_shape), "num_classes": len(mapping)}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture(scope="module")
def transform() -> UNet:
    torch.manual_seed(1)
    unet = UNet(UNetConfig(in_channels=1, width=4, depth=2)).eval()
    with torch.no_grad():  # untrained T is close to constant; shift it so it visibly changes the answers
        unet.out.bias.fill_(0.3)
    return unet


@pytest.fixture(scope="module")
def mapping() -> torch.Tensor:
    return derangement(4, seed=5)


@pytest.fixture(scope="module")
def images(tiny_data) -> torch.Tensor:
    return tiny_data[1].x[:40].float() / 255


def endpoint_for(folder: Path, upstream_url: str, protocol: str, **overrides) -> DefendedEndpoint:
    bundle = load_defense(folder, {"protocol": protocol})
    config = ApiConfig(url=upstream_url, num_classes=bundle.num_classes, protocol=protocol, query_budget=None,
                       batch_size=overrides.pop("batch_size", 16), max_retries=0, timeout_s=5,
                       **overrides)
    return DefendedEndpoint(bundle, config, port=0, allowed_hosts=LOOPBACK, limits=EndpointLimits(max_batch=64))


def post(endpoint: DefendedEndpoint, protocol: str, x: torch.Tensor, **kwargs) -> requests.Response:
    if protocol == "v1":
        body = {"instances": x.tolist()}
    else:
        body = {"id": "req-1", "inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}
    return requests.post(endpoint.url + endpoint.predict_path, json=body, timeout=30, **kwargs)


def values_of(protocol: str, response: requests.Response) -> torch.Tensor:
    body = response.json()
    if protocol == "v1":
        return torch.tensor(body["predictions"])
    out = body["outputs"][0]
    return torch.tensor(out["data"]).reshape(out["shape"])


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("answers", ["labels", "probabilities", "logits"])
def test_answers_equal_m_of_the_api_of_t_in_the_upstreams_protocol_and_kind(
    tmp_path, tiny_model, transform, mapping, images, protocol, answers
) -> None:
    folder = write_defense(tmp_path / "defense", transform, mapping, {"protocol": protocol, "model_name": "model"})
    server = ModelServer(tiny_model, protocol=protocol, labels_only=answers == "labels",
                         output="logits" if answers == "logits" else "probabilities")
    with server, endpoint_for(folder, server.url, protocol) as endpoint:
        response = post(endpoint, protocol, images)
        assert response.status_code == 200, response.text
        got = values_of(protocol, response)
        with torch.no_grad():
            direct = server.infer(transform_images(transform, images, CPU))
    if answers == "labels":
        assert torch.equal(got.long(), mapping[direct])
    else:
        expected = torch.empty_like(direct)
        expected[:, mapping] = direct
        assert torch.allclose(got.float(), expected, atol=1e-5)
        assert torch.equal(got.argmax(1), mapping[direct.argmax(1)])
    if protocol == "v2":
        body = response.json()
        assert body["id"] == "req-1" and body["outputs"][0]["name"] == "output"
        assert body["outputs"][0]["datatype"] == ("INT64" if answers == "labels" else "FP32")
    assert server.stats()["queries"] == len(images) * 2  # every image forwarded once, plus the direct check


def test_defended_labels_match_the_audits_own_defended_api_predictor(tmp_path, tiny_model, transform, mapping, images):
    from auditor.blackbox import defended_api_predict

    folder = write_defense(tmp_path / "defense", transform, mapping, {"protocol": "v1"})
    with ModelServer(tiny_model, protocol="v1", labels_only=True) as server, endpoint_for(folder, server.url, "v1") as endpoint:
        through_endpoint = values_of("v1", post(endpoint, "v1", images)).long()
        api = HttpModelAPI(ApiConfig(url=server.url, num_classes=4, query_budget=None), allowed_hosts=LOOPBACK)
        with api:
            computed = defended_api_predict(api, transform, mapping, images)
    assert torch.equal(through_endpoint, computed)


def test_health_and_readiness_follow_the_upstream(tmp_path, tiny_model, transform, mapping) -> None:
    folder = write_defense(tmp_path / "defense", transform, mapping, {"protocol": "v2"})
    with ModelServer(tiny_model, protocol="v2") as server, endpoint_for(folder, server.url, "v2") as endpoint:
        ready = [requests.get(endpoint.url + path, timeout=10).status_code for path in ("/readyz", "/v2/health/ready")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nothing_there = f"http://127.0.0.1:{sock.getsockname()[1]}"  # a port nobody listens on
    with endpoint_for(folder, nothing_there, "v2") as endpoint:
        live = requests.get(endpoint.url + "/healthz", timeout=10).status_code
        not_ready = requests.get(endpoint.url + "/readyz", timeout=10).status_code
        down = post(endpoint, "v2", torch.rand(2, 1, 16, 16))
    assert ready == [200, 200] and live == 200 and not_ready == 503
    assert down.status_code == 502 and down.json()["code"] == "api_unreachable"


def test_bad_requests_are_refused_before_reaching_the_upstream(tmp_path, tiny_model, transform, mapping) -> None:
    folder = write_defense(tmp_path / "defense", transform, mapping, {"protocol": "v1"})
    with ModelServer(tiny_model, protocol="v1") as server, endpoint_for(folder, server.url, "v1") as endpoint:
        url = endpoint.url + endpoint.predict_path
        wrong_shape = post(endpoint, "v1", torch.rand(2, 1, 8, 8))
        out_of_range = post(endpoint, "v1", torch.rand(2, 1, 16, 16) * 255)
        too_many = post(endpoint, "v1", torch.rand(65, 1, 16, 16))
        not_json = requests.post(url, data=b"{nope", timeout=10)
        wrong_route = requests.post(endpoint.url + "/v1/models/other:predict", json={"instances": []}, timeout=10)
        served = server.stats()["queries"]
    assert wrong_shape.status_code == 400 and "[1, 16, 16]" in wrong_shape.json()["error"]
    assert out_of_range.status_code == 400 and "[0, 1]" in out_of_range.json()["error"]
    assert too_many.status_code == 413
    assert not_json.status_code == 400 and wrong_route.status_code == 404
    assert served == 0


def test_the_upstream_credential_comes_from_a_secret_and_is_sent(tmp_path, tiny_model, transform, mapping, monkeypatch):
    folder = write_defense(tmp_path / "defense", transform, mapping, {"protocol": "v1"})
    monkeypatch.setenv("UPSTREAM_KEY", "Bearer s3cret")
    with ModelServer(tiny_model, protocol="v1", api_key="s3cret") as server:
        with endpoint_for(folder, server.url, "v1", auth_header="Authorization", auth_env="UPSTREAM_KEY") as endpoint:
            allowed = post(endpoint, "v1", torch.rand(3, 1, 16, 16))
        with endpoint_for(folder, server.url, "v1") as endpoint:
            refused = post(endpoint, "v1", torch.rand(3, 1, 16, 16))
    assert allowed.status_code == 200 and len(allowed.json()["predictions"]) == 3
    assert refused.status_code == 502 and refused.json()["code"] == "api_auth_failed"


def test_the_ssrf_guard_refuses_a_private_upstream_unless_allowlisted(tmp_path, transform, mapping) -> None:
    bundle = load_defense(write_defense(tmp_path / "defense", transform, mapping, {"protocol": "v1"}))
    config = ApiConfig(url="http://127.0.0.1:9/v1/models/model:predict", num_classes=4, query_budget=None)
    with pytest.raises(AuditError) as refused:
        DefendedEndpoint(bundle, config, port=0)
    assert refused.value.code.value == "url_not_allowed"


def test_a_defense_folder_without_a_protocol_or_with_bad_files_is_refused(tmp_path, transform, mapping) -> None:
    checkpoint_audit = load_defense(write_defense(tmp_path / "ckpt", transform, mapping, None))
    assert checkpoint_audit.api is None
    assert load_defense(tmp_path / "ckpt", {"protocol": "v2"}).api.protocol == "v2"
    broken = write_defense(tmp_path / "broken", transform, mapping, {"protocol": "v1"})
    (broken / "defense.json").write_text(json.dumps({"mapping": [0, 0, 1, 2], "refine_config": {}}))
    with pytest.raises(AuditError, match="permutation"):
        load_defense(broken)
    with pytest.raises(AuditError, match="missing"):
        load_defense(tmp_path / "nowhere")
