"""The model-API client against the real reference server over loopback HTTP.

Failure handling contract checked here:
  401/403                       -> api_auth_failed at once (no retry)
  429 and 5xx                   -> retried with backoff; still failing after max_retries -> api_unreachable
  timeouts                      -> retried; still timing out -> api_timeout
  connection refused            -> retried; then api_unreachable
  malformed answers, 4xx, 3xx   -> api_bad_response at once (retrying cannot fix them)
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from contextlib import contextmanager

import pytest
import requests
import torch
from torch import nn

from shared_fixtures import service_missing

from auditor.blackbox import ApiConfig, Fault, HttpModelAPI, ModelServer
from auditor.blackbox.client import TokenBucket
from auditor.errors import AuditError, ErrorCode

LOOPBACK = ("127.0.0.1",)
K = 4


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, K))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@contextmanager
def served(model: nn.Module, **server_kwargs):
    with ModelServer(model, **server_kwargs) as server:
        yield server


def client(server: ModelServer, sleep=time.sleep, **config) -> HttpModelAPI:
    config.setdefault("url", server.url)
    config.setdefault("num_classes", K)
    config.setdefault("backoff_base_s", 0.01)
    config.setdefault("timeout_s", 5.0)
    return HttpModelAPI(ApiConfig(**config), allowed_hosts=LOOPBACK, sleep=sleep)


def expect_error(code: ErrorCode, api: HttpModelAPI, x: torch.Tensor) -> AuditError:
    with pytest.raises(AuditError) as info:
        api.predict(x)
    assert info.value.code is code, info.value
    return info.value


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("served_output", ["probabilities", "logits", "labels"])
def test_both_protocols_return_the_models_probabilities_for_every_output_kind(model, images, protocol, served_output):
    server_kwargs = {"labels_only": True} if served_output == "labels" else {"output": served_output}
    with served(model, protocol=protocol, **server_kwargs) as server, client(server, protocol=protocol, batch_size=5) as api:
        probs = api.predict(images)
    expected = torch.softmax(model(images), dim=1).detach()
    assert probs.shape == (len(images), K)
    assert api.output_kind == served_output
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    if served_output == "labels":
        assert torch.equal(probs.sum(1), torch.ones(len(images)))  # one-hot rows
    else:
        assert torch.allclose(probs, expected, atol=1e-5)


def test_json_template_maps_request_key_and_response_path(model, images):
    with served(model, protocol="v1") as server:
        url = f"{server.url}/v1/models/model:predict"
        with client(server, url=url, protocol="json", json_request_key="instances", json_response_path="predictions") as api:
            probs = api.predict(images)
    assert torch.allclose(probs, torch.softmax(model(images), 1).detach(), atol=1e-5)


def test_nhwc_layout_reaches_a_channels_last_server(model, images):
    with served(model, input_layout="nhwc") as server, client(server, input_layout="nhwc") as api:
        probs = api.predict(images)
    assert torch.allclose(probs, torch.softmax(model(images), 1).detach(), atol=1e-5)


def test_the_cache_never_pays_twice_for_the_same_image(model, images):
    with served(model) as server, client(server, batch_size=4) as api:
        first = api.predict(images)
        again = api.predict(torch.cat([images[:5], images[:5]]))  # repeats across and within calls
        stats = server.stats()
    assert torch.equal(again, torch.cat([first[:5], first[:5]]))
    assert stats["queries"] == len(images) == api.queries_used
    assert api.counters()["cache_hits"] == 10


def test_duplicates_inside_one_call_are_sent_once(model, images):
    with served(model) as server, client(server) as api:
        api.predict(torch.cat([images[:3], images[:3], images[:3]]))
        assert server.stats()["queries"] == 3 == api.queries_used


def test_budget_refuses_a_call_before_sending_anything(model, images):
    with served(model) as server, client(server, query_budget=10) as api:
        api.predict(images[:6])
        requests_before = api.counters()["requests_sent"]
        error = expect_error(ErrorCode.QUERY_BUDGET_EXHAUSTED, api, images[6:12])
        assert error.detail == {"budget": 10, "used": 6, "requested": 6}
        assert server.stats()["queries"] == 6
        assert api.counters()["requests_sent"] == requests_before
        api.predict(images[:6])  # cached answers stay free
        api.predict(images[6:10])  # and what still fits is allowed
        assert server.stats()["queries"] == 10 == api.queries_used
        assert api.remaining_budget == 0


def test_images_of_a_failed_request_are_charged_once_and_not_again_when_resent(model, images):
    with served(model) as server, client(server, query_budget=4, max_retries=0) as api:
        server.fail_always(Fault(status=503))
        expect_error(ErrorCode.API_UNREACHABLE, api, images[:4])
        assert api.queries_used == 4  # charged: the API may have processed them
        server.fail_always(None)
        api.predict(images[:4])  # re-sending the same images fits the exhausted budget
        assert api.queries_used == 4 == server.stats()["queries"]


def test_server_errors_are_retried_until_success(model, images):
    with served(model) as server, client(server, max_retries=3) as api:
        server.inject(Fault(status=500), Fault(status=503))
        probs = api.predict(images[:4])
        counters = api.counters()
        assert server.stats()["queries"] == 4
    assert torch.allclose(probs, torch.softmax(model(images[:4]), 1).detach(), atol=1e-5)
    assert counters["requests_sent"] == 3 and counters["retries"] == 2


def test_persistent_server_errors_end_in_api_unreachable_after_the_retries(model, images):
    with served(model) as server, client(server, max_retries=2) as api:
        server.fail_always(Fault(status=500))
        error = expect_error(ErrorCode.API_UNREACHABLE, api, images[:4])
        assert api.counters()["requests_sent"] == 3
    assert error.detail["status"] == 500


@pytest.mark.parametrize(("cap", "wait_s"), [(5.0, 1.0), (0.2, 0.2)])
def test_retry_after_is_honoured_up_to_the_cap(model, images, cap, wait_s):
    """The waits are recorded, not slept: what is checked is the client's decision, not the machine's speed."""
    waits: list[float] = []
    with served(model) as server, client(server, max_backoff_s=cap, backoff_base_s=0.01, sleep=waits.append) as api:
        server.inject(Fault(status=429, headers=(("Retry-After", "1"),)))
        api.predict(images[:2])
    assert waits == [pytest.approx(wait_s)]


def test_a_slow_api_ends_in_api_timeout_without_hanging(model, images):
    """The server would answer after a minute; each attempt gives up at the 0.2 s timeout instead.

    The bound is the server's delay, not a guess at how fast this machine is: a client that
    waited for the answer would take at least 60 s per attempt, one that honours its timeout
    takes a fraction of a second plus whatever a busy machine adds.
    """
    with served(model) as server, client(server, timeout_s=0.2, max_retries=1, sleep=lambda s: None) as api:
        server.fail_always(Fault(delay_s=60.0))
        started = time.monotonic()
        expect_error(ErrorCode.API_TIMEOUT, api, images[:2])
        elapsed = time.monotonic() - started
        assert api.counters()["requests_sent"] == 2
    assert elapsed < 30.0


def test_token_bucket_spaces_acquisitions_on_a_fake_clock():
    clock = FakeClock()
    bucket = TokenBucket(20.0, clock=clock.now, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(5)]
    assert waits[0] == 0.0 and waits[1:] == [pytest.approx(0.05)] * 4
    assert clock.t == pytest.approx(0.2)  # 5 requests at 20/s: 4 gaps of 50 ms


@pytest.mark.parametrize("corrupt", ["wrong_shape", "nan", "extra_class", "not_json", "huge"])
@pytest.mark.parametrize("labels_only", [False, True])
def test_malformed_answers_are_api_bad_response_without_retry(model, images, corrupt, labels_only):
    if labels_only and corrupt == "nan":
        pytest.skip("labels are integers; NaN is a score-row fault")
    with served(model, labels_only=labels_only) as server:
        with client(server, max_response_bytes=1024 * 1024, max_retries=3) as api:
            server.inject(Fault(corrupt=corrupt))
            expect_error(ErrorCode.API_BAD_RESPONSE, api, images[:4])
            assert api.counters()["requests_sent"] == 1


def test_a_request_the_server_rejects_is_api_bad_response(model):
    wrong_size = torch.rand(2, 1, 4, 4)  # the served model expects 8x8 images
    with served(model) as server, client(server) as api:
        error = expect_error(ErrorCode.API_BAD_RESPONSE, api, wrong_size)
    assert error.detail["status"] == 400


def test_wrong_model_name_is_api_bad_response(model, images):
    with served(model, model_name="real") as server, client(server, model_name="other") as api:
        assert expect_error(ErrorCode.API_BAD_RESPONSE, api, images[:2]).detail["status"] == 404


def test_missing_credentials_are_api_auth_failed_and_the_secret_never_leaks(model, images, monkeypatch):
    secret = "s3cret-token-123"
    with served(model, api_key=secret) as server:
        with client(server, max_retries=3) as api:
            expect_error(ErrorCode.API_AUTH_FAILED, api, images[:2])
            assert api.counters()["requests_sent"] == 1  # no retry: a wrong key does not heal
        monkeypatch.setenv("MODEL_API_TOKEN", f"Bearer {secret}")
        config_kwargs = {"auth_header": "Authorization", "auth_env": "MODEL_API_TOKEN"}
        with client(server, **config_kwargs) as api:
            assert api.predict(images[:2]).shape == (2, K)
        with client(server, auth_header="Authorization", auth_value="Bearer wrong") as api:
            error = expect_error(ErrorCode.API_AUTH_FAILED, api, images[:2])
            assert "wrong" not in repr(api.config) and "wrong" not in str(error.to_dict())


def test_a_missing_secret_variable_is_named_in_the_error(model, images, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with served(model) as server, client(server, auth_header="Authorization", auth_env="NOT_SET_ANYWHERE") as api:
        error = expect_error(ErrorCode.INVALID_SPEC, api, images[:2])
    assert error.detail == {"variable": "NOT_SET_ANYWHERE"}


def test_nothing_listening_is_api_unreachable(images):
    with ModelServer(tiny_model()) as server:
        url = server.url  # a port that was just in use and is now closed
    api = HttpModelAPI(ApiConfig(url=url, num_classes=K, max_retries=1, backoff_base_s=0.01), allowed_hosts=LOOPBACK)
    with api:
        expect_error(ErrorCode.API_UNREACHABLE, api, images[:2])


def test_concurrent_batches_keep_the_input_order(model):
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with served(model) as server, client(server, batch_size=4, max_concurrency=3) as api:
        probs = api.predict(x)
        assert api.counters()["requests_sent"] == 8 == server.stats()["requests"]
    assert torch.allclose(probs, torch.softmax(model(x), 1).detach(), atol=1e-5)


class FakeClock:
    """Time that passes only when slept through."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_rate_limit_spaces_requests(model, images):
    with served(model) as server, client(server, batch_size=2, rate_limit_per_s=20.0, max_concurrency=2) as api:
        started = time.monotonic()
        api.predict(images[:10])  # 5 requests at 20/s: at least 4 gaps of 50 ms
        elapsed = time.monotonic() - started
    assert elapsed >= 0.19


def test_server_reports_stats_health_and_metadata(model, images):
    with served(model, model_name="fm") as server:
        with client(server, model_name="fm", protocol="v2") as api:
            api.predict(images[:3])
        get = lambda path: requests.get(server.url + path, timeout=5)  # noqa: E731
        assert get("/stats").json() == {"queries": 3, "requests": 1}
        assert get("/v2/health/ready").status_code == 200
        assert get("/v1/models/fm").json()["model_version_status"][0]["state"] == "AVAILABLE"
        assert get("/v2/models/fm").json()["name"] == "fm"
        assert get("/v2/models/other").status_code == 404


@pytest.mark.parametrize(
    "bad",
    [{"protocol": "v3"}, {"output": "scores"}, {"num_classes": 1}, {"batch_size": 0}, {"auth_env": "X"},
     {"rate_limit_per_s": 0.0}, {"query_budget": -1}],
)
def test_config_validation_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        ApiConfig(**{"url": "http://93.184.216.34", "num_classes": K, **bad})


def test_base_urls_get_the_standard_paths():
    assert ApiConfig(url="http://h:1/", num_classes=2).endpoint() == "http://h:1/v1/models/model:predict"
    assert ApiConfig(url="http://h:1/v1/models/m:predict", num_classes=2).endpoint().endswith("/m:predict")
    assert ApiConfig(url="http://h:1", num_classes=2, protocol="v2", model_name="m").endpoint() == (
        "http://h:1/v2/models/m/infer"
    )


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory):
    """A self-signed certificate for the name "localhost" (not for 127.0.0.1)."""
    if shutil.which("openssl") is None:
        service_missing("openssl is not installed", hint="scripts/bootstrap.sh installs it")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-days", "1"],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_connects_to_the_pinned_ip_but_verifies_the_certificate_for_the_host_name(model, images, localhost_cert):
    cert, key = localhost_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with ModelServer(model, ssl_context=context) as server:
        by_name = ApiConfig(url=f"https://localhost:{server.port}", num_classes=K, ca_bundle=str(cert))
        with HttpModelAPI(by_name, allowed_hosts=("localhost",)) as api:
            assert torch.allclose(api.predict(images[:3]), torch.softmax(model(images[:3]), 1).detach(), atol=1e-5)
        by_ip = ApiConfig(url=f"https://127.0.0.1:{server.port}", num_classes=K, ca_bundle=str(cert), max_retries=2)
        with HttpModelAPI(by_ip, allowed_hosts=LOOPBACK) as api:  # the certificate does not name 127.0.0.1
            assert expect_error(ErrorCode.API_UNREACHABLE, api, images[:3]).detail["reason"] == "tls"
            assert api.counters()["requests_sent"] == 1  # certificate errors are not retried
        untrusted = ApiConfig(url=f"https://localhost:{server.port}", num_classes=K)
        with HttpModelAPI(untrusted, allowed_hosts=("localhost",)) as api:
            assert expect_error(ErrorCode.API_UNREACHABLE, api, images[:3]).detail["reason"] == "tls"
        assert server.stats()["queries"] == 3
