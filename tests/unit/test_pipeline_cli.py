"""The audit end to end through the CLI, on tiny Fashion-MNIST subsets so each run takes seconds."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from shared_fixtures import TINY_FMNIST_ARCH, train_tiny_fmnist_model

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.blackbox import ModelServer
from auditor.cli import EXIT_FAILED, EXIT_INVALID_INPUT, main
from auditor.data import load_fashion_mnist, take
from auditor.evaluation import attack_metrics, model_predictor
from auditor.pipeline import AuditInputs, run_audit
from auditor.report import report_json_schema
from auditor.spec import parse_spec
from auditor.training import TrainConfig

TINY = ["--effort", "tiny", "--train-size", "600", "--test-size", "200", "--attacks", "badnets", "--quiet"]


@pytest.fixture(scope="module")
def fmnist_model(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return train_tiny_fmnist_model(tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def backdoored_fmnist_model(tmp_path_factory) -> torch.nn.Module:
    """The black-box target: a tiny BadNets model whose backdoor demonstrably fires."""
    train, test = load_fashion_mnist(cache_dir=tmp_path_factory.mktemp("cache"))
    bd = train_backdoored_model(TINY_FMNIST_ARCH, take(train, 4000, seed=0), take(test, 300, seed=0),
                                AttackConfig("badnets", target=0, seed=0, poison_rate=0.1),
                                TrainConfig(epochs=4, batch_size=32), device=torch.device("cpu"), seed=0)
    metrics = attack_metrics(model_predictor(bd.model, torch.device("cpu")), take(test, 300, seed=0),
                             bd.poisoned_test, bd.attack.target)
    assert metrics.asr > 0.8, metrics
    return bd.model.eval()


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _check_report(out: Path) -> dict:
    report = json.loads((out / "out" / "report.json").read_text())
    jsonschema.validate(report, report_json_schema())
    for name in ("report.html", "report.pdf"):
        assert (out / "out" / name).stat().st_size > 1000
    return report


def test_checkpoint_audit_through_the_cli_writes_a_valid_report(tmp_path, fmnist_model):
    _, model_path = fmnist_model
    result = _invoke(["audit", str(model_path), "--out", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.output
    report = _check_report(tmp_path)
    assert report["status"] == "succeeded"
    assert report["inputs"]["model"]["format"] == "safetensors"
    assert report["positive_controls"][0]["attack"] == "badnets"
    assert 0.0 <= report["utility"]["ba_after"] <= 1.0
    assert (tmp_path / "out" / "defended_model.pt").exists()
    assert {e["format"]: e["check"]["images"] for e in report["refine"]["exports"]} == {
        "torch_export": 200, "onnx": 200, "torchscript": 200}  # every test image, as there are fewer than 2,000
    assert report["plan"]["effort"] == "tiny" and report["plan"]["data"]["test_images"] == 200
    detection = report["detection"]  # the trigger search ran on the submitted model, timed like every stage
    assert detection["model"] == "submitted" and report["plan"]["detection"]["steps"] == detection["steps"]
    assert detection["success"]["n"] > 0 and len(detection["mask_norms"]) == 10 and "detect" in report["timings"]["stages"]
    assert (tmp_path / "out" / detection["image"]).stat().st_size > 1000
    assert detection["image"] in {a["name"] for a in report["artifacts"]} | {i["file"] for i in report["images"]}
    assert report["verdict"]["trigger_evidence"] == detection["counts_toward_verdict"]
    assert "trigger search: class" in result.output and "recovered: " in result.output


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory, fmnist_model):
    """A tiny audit without positive controls through the CLI, and its folder: two tests read the same run."""
    _, model_path = fmnist_model
    out = tmp_path_factory.mktemp("tiny-audit")
    result = _invoke(["audit", str(model_path), "--out", str(out), *TINY, "--attacks", ""])
    assert result.exit_code == 0, result.output
    return result, out


def test_tiny_effort_is_inconclusive_and_never_recommends_its_defended_model(tiny_audit):
    """One REFINE epoch on 512 images cannot keep the model: the gates say so and the headline does not recommend it."""
    result, out = tiny_audit
    report = _check_report(out)

    tripped = {g["name"] for g in report["gates"] if g["tripped"]}
    assert report["verdict"]["level"] == "inconclusive" and {"probe_images", "evaluation_size"} <= tripped
    assert report["verdict"]["reason"] and report["verdict"]["reason"] in report["verdict"]["headline"]
    assert not report["defended_model"]["fit_to_deploy"], report["utility"]
    assert "Do not deploy the defended model." in report["verdict"]["headline"]
    assert "use the defended model" not in report["verdict"]["headline"].lower()
    assert "defended model fit to deploy: no" in result.output
    assert all(_sentence(g["reason"]) in report["warnings"] for g in report["gates"] if g["tripped"])


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def test_plan_flag_prints_the_plan_and_trains_nothing(tmp_path, fmnist_model):
    _, model_path = fmnist_model
    result = _invoke(["audit", str(model_path), "--out", str(tmp_path), "--plan"])
    assert result.exit_code == 0, result.output
    assert "standard (checkpoint audit" in result.output and "Estimated time" in result.output
    assert "6 epochs over 20,000 images, U-Net width 16" in result.output
    assert "Trigger search" in result.output and "300 steps per class" in result.output
    assert not (tmp_path / "out").exists()


def test_plan_flag_refuses_a_budget_too_small_with_the_minimum():
    result = _invoke(["audit", "--api", "http://127.0.0.1:9/v1/models/m:predict", "--output", "labels",
                      "--query-budget", "5000", "--allow-host", "127.0.0.1", "--plan"])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "insufficient_query_budget" in result.output and "needs at least" in result.output


@pytest.mark.parametrize(("protocol", "refine_epochs"), [("v1", "1"), ("v2", "2")])
def test_api_audit_of_a_backdoored_model_through_the_cli_stays_within_budget(tmp_path, backdoored_fmnist_model,
                                                                            protocol, refine_epochs):
    model = backdoored_fmnist_model
    budget = 3000
    with ModelServer(model, protocol=protocol, labels_only=True) as server:
        url = server.url + ("/v1/models/model:predict" if protocol == "v1" else "")
        result = _invoke([
            "audit", "--api", url, "--protocol", protocol, "--output", "labels", "--query-budget", str(budget),
            "--allow-host", "127.0.0.1", "--out", str(tmp_path), *TINY, "--refine-epochs", refine_epochs,
        ])
        served = server.stats()["queries"]
    assert result.exit_code == 0, result.output
    report = _check_report(tmp_path)
    assert report["inputs"]["model"]["source"] == "api"
    assert report["queries"]["queries_used"] == served <= budget
    assert report["surrogate"]["agreement_clean"] > 0.5
    assert report["detection"]["model"] == "surrogate" and not report["detection"]["counts_toward_verdict"]
    # a one-epoch REFINE has no epoch after which a refit could still help T
    assert [r["epoch"] for r in report["surrogate"]["refits"]] == ([] if refine_epochs == "1" else [1])
    assert all(r["queries"] > 0 for r in report["surrogate"]["refits"])


def test_an_api_audit_runs_the_label_only_detection_within_its_reserved_queries(tmp_path, backdoored_fmnist_model):
    """run_audit with spec fields only, the model behind the reference server: the section, its picture in the
    HTML, and the queries it sent within the plan's reservation (the verdict does not read it)."""
    with ModelServer(backdoored_fmnist_model, protocol="v1", labels_only=True) as server:
        spec = parse_spec({"effort": "tiny", "data": {"train_size": 600, "test_size": 200},
                           "controls": {"attacks": []}, "refine": {"epochs": 1}, "model": {"source": "api", "api": {
                               "url": server.url + "/v1/models/model:predict", "output": "labels",
                               "query_budget": 3000, "label_only_detection": True}}})
        result = run_audit(spec, AuditInputs(tmp_path, allowed_hosts=("127.0.0.1",)))
        served = server.stats()["queries"]
    assert result.status == "succeeded", result.error
    report = _check_report(tmp_path)
    plan, section = report["plan"], report["detection"]["label_only"]
    assert plan["label_only"]["queries"] == plan["queries"]["detection"] > 0
    assert 0 < section["queries"] <= section["query_cap"] == plan["queries"]["detection"]
    assert report["queries"]["queries_used"] == served <= 3000
    assert section["calibrated"] is False and section["counts_toward_verdict"] is False
    assert len(section["peaks"]) == 10 and section["method"] == "aeva-peak"
    assert (tmp_path / "out" / section["image"]).stat().st_size > 1000
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Label-only detection on the API" in html and "did not tell backdoored from clean models apart" in html


def test_cancel_during_refine_stops_within_one_batch(tmp_path, fmnist_model):
    _, model_path = fmnist_model
    spec = parse_spec({"effort": "tiny", "data": {"train_size": 600, "test_size": 200}, "controls": {"attacks": []},
                       "refine": {"pool_size": 512, "epochs": 2}})
    refine_steps: list[int] = []

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage == "refine" and total > 1 and done > 0:
            refine_steps.append(done)

    result = run_audit(spec, AuditInputs(tmp_path, model_path=model_path), on_progress, should_cancel=lambda: len(refine_steps) >= 2)
    assert result.status == "cancelled"
    assert result.error["code"] == "cancelled"
    assert refine_steps == [1, 2]  # the poll before the third batch stopped it
    assert json.loads((tmp_path / "out" / "report.json").read_text())["status"] == "cancelled"


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_exits_with_invalid_input(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"w": _Payload(str(marker))}, bad)
    result = _invoke(["audit", str(bad), "--out", str(tmp_path / "a"), *TINY])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "invalid_checkpoint" in result.output
    assert not marker.exists()


def test_bad_dataset_exits_with_invalid_input(tmp_path, fmnist_model):
    _, model_path = fmnist_model
    data = tmp_path / "d.npz"
    import numpy as np

    np.savez(data, x=np.zeros((50, 28, 28), dtype=np.float32))
    result = _invoke(["audit", str(model_path), "--data", str(data), "--out", str(tmp_path / "a"), *TINY])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "invalid_dataset" in result.output


def test_unreachable_api_exits_with_failure_code(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    result = _invoke(["audit", "--api", f"http://127.0.0.1:{port}/v1/models/m:predict", "--allow-host", "127.0.0.1",
                      "--out", str(tmp_path), *TINY])
    assert result.exit_code == EXIT_FAILED
    assert "api_unreachable" in result.output


def test_private_api_address_is_refused_as_invalid_input(tmp_path):
    result = _invoke(["audit", "--api", "http://10.0.0.1/v1/models/m:predict", "--out", str(tmp_path), *TINY])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "url_not_allowed" in result.output


def test_invalid_spec_names_the_field(tmp_path, fmnist_model):
    _, model_path = fmnist_model
    result = _invoke(["audit", str(model_path), "--attacks", "nosuchattack", "--out", str(tmp_path)])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "controls.attacks" in result.output


def test_report_command_rerenders_html_and_pdf(tmp_path, tiny_audit):
    _, out = tiny_audit
    result = _invoke(["report", str(out / "out" / "report.json"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "report.pdf").stat().st_size > 1000
