"""MLflow as a model source, against a real ``mlflow server`` (SQLite backend, proxied local artifacts).

A model version whose artifact is a safetensors checkpoint is audited by ``models:/name/1``
and its verdict tags and report files land on the version and its run; a pickled
version is refused with ``invalid_checkpoint`` without being unpickled; the server's
failures have stable codes; the REST API refuses malformed references with 422.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from api_support import Api, api_factory, sqlite_api  # noqa: F401 (fixtures)
from shared_fixtures import service_missing, train_tiny_fmnist_model

from auditor.pipeline import AuditInputs, run_audit
from auditor.registry.source import MlflowConfig, registry_runner
from auditor.spec import parse_spec

START_TIMEOUT_S = 300  # a cold start migrates a fresh SQLite registry: about a minute on a loaded 2-core machine
TINY_MLFLOW_SPEC: dict[str, Any] = {"effort": "tiny", "data": {"train_size": 600, "test_size": 200},
                                    "controls": {"attacks": []}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_binary() -> str | None:
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else shutil.which("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server with a model registry and an artifact proxy; its URL."""
    binary = _mlflow_binary()
    if binary is None:
        service_missing("the mlflow server is not installed", "pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [binary, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
         str(root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: 7 fewer processes
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(server, url, root / "server.log")
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=5)  # uvicorn drains politely; nothing here needs it
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def _wait_until_up(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def registry(mlflow_server: str) -> Any:
    """The mlflow package's own client (a dev dependency), to register versions as a user would."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


def _register(registry: Any, name: str, files: dict[str, Path]) -> tuple[str, str]:
    """A run holding ``files`` under ``model/`` (artifact path -> local file), registered as version 1 of ``name``."""
    run = registry.create_run("0")
    for artifact_path, local in files.items():
        folder = "/".join(["model", *artifact_path.split("/")[:-1]])
        registry.log_artifact(run.info.run_id, str(local), folder)
    registry.set_terminated(run.info.run_id)
    registry.create_registered_model(name)
    version = registry.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return run.info.run_id, version.version


def _inputs(tmp_path: Path, audit_id: str) -> AuditInputs:
    return AuditInputs(work_dir=tmp_path / "work", audit_id=audit_id, device="cpu", cache_dir=tmp_path / "cache")


def _tags(registry: Any, name: str, version: str) -> dict[str, str]:
    return dict(registry.get_model_version(name, version).tags)


def test_a_registered_safetensors_version_is_audited_and_tagged_with_its_verdict(
        tmp_path: Path, mlflow_server: str, registry: Any) -> None:
    _, checkpoint = train_tiny_fmnist_model(tmp_path / "cache", tmp_path)
    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text("artifact_path: model\nflavors: {}\n")
    run_id, version = _register(registry, "tiny-classifier", {"model.safetensors": checkpoint, "MLmodel": mlmodel})
    spec = parse_spec({**TINY_MLFLOW_SPEC, "model": {"mlflow": {"uri": f"models:/tiny-classifier/{version}"}}})
    runner = registry_runner(run_audit, MlflowConfig(mlflow_server, max_bytes=64 << 20))

    result = runner(spec, _inputs(tmp_path, "mlflow-audit-1"))

    assert result.status == "succeeded", result.error
    report = result.report
    assert report["spec"]["model"]["mlflow"] == {"uri": f"models:/tiny-classifier/{version}",
                                                 "path": "model.safetensors", "write_back": True}
    assert report["inputs"]["model"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    tags = _tags(registry, "tiny-classifier", version)
    assert tags["refine_audit.status"] == "succeeded" and tags["refine_audit.audit_id"] == "mlflow-audit-1"
    assert tags["refine_audit.verdict"] == result.summary["verdict"] == "inconclusive"  # tiny effort: gates trip
    assert float(tags["refine_audit.ba_before"]) == pytest.approx(result.summary["ba_before"], abs=1e-4)
    assert float(tags["refine_audit.ba_after"]) == pytest.approx(result.summary["ba_after"], abs=1e-4)
    assert float(tags["refine_audit.suspicion_before"]) == pytest.approx(result.summary["suspicion_before"], abs=1e-4)
    assert tags["refine_audit.gates_tripped"] == ",".join(result.summary["gates_tripped"])
    assert tags["refine_audit.report"] == f"runs:/{run_id}/refine-audit/mlflow-audit-1/"
    assert "refine_audit.error_code" not in tags
    logged = {f.path: f.file_size for f in registry.list_artifacts(run_id, "refine-audit/mlflow-audit-1")}
    assert set(logged) == {f"refine-audit/mlflow-audit-1/{n}" for n in ("report.json", "report.html", "report.pdf")}
    (tmp_path / "downloaded").mkdir()
    downloaded = registry.download_artifacts(run_id, "refine-audit/mlflow-audit-1/report.json", str(tmp_path / "downloaded"))
    assert json.loads(Path(downloaded).read_text())["audit_id"] == "mlflow-audit-1"
    assert not any("write-back" in w for w in report["warnings"])


class Tripwire:
    """Unpickling this creates ``marker``: proof of whether anything deserialized the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickled_version_is_refused_as_invalid_checkpoint_and_never_unpickled(
        tmp_path: Path, mlflow_server: str, registry: Any) -> None:
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "model.pth"
    torch.save(Tripwire(marker), pickled)  # what mlflow.pytorch's pickle format writes: torch.save of an object
    assert not marker.exists()
    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text("artifact_path: model\nflavors:\n  pytorch:\n    model_data: data\n")
    _, version = _register(registry, "pickled-classifier", {"data/model.pth": pickled, "MLmodel": mlmodel})
    spec = parse_spec({**TINY_MLFLOW_SPEC, "model": {"mlflow": {"uri": f"models:/pickled-classifier/{version}"}}})
    runner = registry_runner(run_audit, MlflowConfig(mlflow_server, max_bytes=64 << 20))

    result = runner(spec, _inputs(tmp_path, "mlflow-audit-2"))

    assert result.status == "failed" and result.error["code"] == "invalid_checkpoint"
    message = result.error["message"]
    assert "data/model.pth" in message and "never unpickles" in message
    assert "safetensors" in message and "TorchScript" in message and ".pt2" in message
    assert not marker.exists()
    tags = _tags(registry, "pickled-classifier", version)
    assert tags["refine_audit.status"] == "failed" and tags["refine_audit.error_code"] == "invalid_checkpoint"


def test_server_failures_have_stable_codes(tmp_path: Path, mlflow_server: str) -> None:
    spec = parse_spec({**TINY_MLFLOW_SPEC, "model": {"mlflow": {"uri": "models:/no-such-model/7"}}})
    missing = registry_runner(run_audit, MlflowConfig(mlflow_server, max_bytes=1 << 20))(spec, _inputs(tmp_path, "a"))
    assert missing.status == "failed" and missing.error["code"] == "mlflow_not_found", missing.error
    assert "no-such-model" in missing.error["message"]
    down = MlflowConfig(f"http://127.0.0.1:{_free_port()}", max_bytes=1 << 20, timeout_s=2)
    unreachable = registry_runner(run_audit, down)(spec, _inputs(tmp_path, "b"))
    assert unreachable.error["code"] == "mlflow_unreachable", unreachable.error
    unset = registry_runner(run_audit, MlflowConfig(None, max_bytes=1 << 20))(spec, _inputs(tmp_path, "c"))
    assert unset.error["code"] == "mlflow_unreachable" and "REFINE_AUDIT_MLFLOW_TRACKING_URI" in unset.error["message"]


def test_the_rest_api_checks_the_reference_at_submission(
        sqlite_api: Api, tmp_path: Path, api_factory: Any, sqlite_engine: Any,  # noqa: F811
        mlflow_server: str, registry: Any) -> None:
    def submit(api: Api, uri: str) -> Any:
        return api.submit_json(api.token(), {"effort": "tiny", "model": {"mlflow": {"uri": uri}}})

    bad = submit(sqlite_api, "models:/x/../1")
    assert bad.status_code == 422 and bad.get_json()["error"]["code"] == "invalid_spec"
    assert bad.get_json()["error"]["detail"]["fields"][0]["field"] == "model.mlflow.uri"
    unconfigured = submit(sqlite_api, "models:/x/1")
    assert unconfigured.status_code == 422 and "REFINE_AUDIT_MLFLOW_TRACKING_URI" in unconfigured.get_json()["error"]["message"]
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"checked by the worker, not at submission")
    _, version = _register(registry, "rest-classifier", {"model.safetensors": weights})
    configured = api_factory(sqlite_engine, REFINE_AUDIT_MLFLOW_TRACKING_URI=mlflow_server)

    accepted = submit(configured, f"models:/rest-classifier/{version}")
    unknown = submit(configured, "models:/rest-classifier/99")
    both = configured.submit(configured.token(), b"weights", {"model": {"mlflow": {"uri": "models:/rest-classifier/1"}}})
    down = submit(api_factory(sqlite_engine, REFINE_AUDIT_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}"),
                  "models:/rest-classifier/1")

    assert accepted.status_code == 202, accepted.get_json()
    assert unknown.status_code == 422 and unknown.get_json()["error"]["code"] == "mlflow_not_found"
    assert both.status_code == 422 and both.get_json()["error"]["detail"]["fields"][0]["field"] == "model.mlflow"
    assert down.status_code == 502 and down.get_json()["error"]["code"] == "mlflow_unreachable"


def test_the_cli_reads_mlflow_references_from_the_configured_server(tmp_path: Path, mlflow_server: str) -> None:
    from click.testing import CliRunner

    from auditor.cli import EXIT_INVALID_INPUT, main

    env = {"REFINE_AUDIT_MLFLOW_TRACKING_URI": mlflow_server, "REFINE_AUDIT_DATA_DIR": str(tmp_path / "data")}
    args = ["audit", "--mlflow", "models:/no-such-model/1", "--no-sandbox", "--quiet", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == EXIT_INVALID_INPUT, result.output
    assert "[mlflow_not_found]" in result.output and "no-such-model" in result.output
    refused = CliRunner().invoke(main, ["audit", "--mlflow", "runs:/x/../m", "--out", str(tmp_path / "out")], env=env)
    assert refused.exit_code == EXIT_INVALID_INPUT and "model.mlflow.uri" in refused.output


def test_a_failed_write_back_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    from auditor.pipeline import ArtifactFile, AuditResult
    from auditor.registry.mlflow import MlflowClient
    from auditor.registry.source import FetchedModel, write_back_quietly
    from auditor.registry.uri import parse_mlflow_uri

    out = tmp_path / "out"
    out.mkdir()
    (out / "audit.log").write_text("")
    (out / "report.html").write_text("<html></html>")
    result = AuditResult("succeeded", out, None, {"status": "succeeded", "verdict": "no_evidence"},
                         [ArtifactFile("report.html", out / "report.html", "report", "text/html")])
    down = MlflowClient(f"http://127.0.0.1:{_free_port()}", timeout_s=2, retries=0)
    fetched = FetchedModel(parse_mlflow_uri("models:/m/1"), tmp_path / "model", "model.safetensors", "r1")

    write_back_quietly(down, fetched, result, "audit-9")

    assert result.status == "succeeded"
    lines = (out / "audit.log").read_text().splitlines()
    assert len(lines) == 2 and all("WARNING" in line and "MLflow write-back" in line for line in lines)
    assert "report files were not logged to run r1" in lines[0] and "tags were not set on models:/m/1" in lines[1]
