"""The CI gate, the metrics and the JSON logs against the real service.

The two pipeline examples of ``docs/ci-gate.md`` are taken from the document and run
as written (only the effort shrinks to CI size and the server variable points at the
test's service): the GitHub Actions step must close the gate on a backdoored model
(exit 1) and the GitLab job must pass a clean one (exit 0). Meanwhile ``/metrics`` is
scraped through gunicorn and must show both audits moving, and the worker, logging
JSON, must stamp each audit's lines with its id.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.processes import BIN
from e2e.service_support import (  # noqa: F401 (fixtures)
    AUDITS_S,
    Service,
    broker_url,
    database_url,
    fmnist_model,
    service,
)
from shared_fixtures import train_tiny_backdoored_fmnist_model

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DOC = Path(__file__).resolve().parents[2] / "docs" / "ci-gate.md"
CI_EFFORT = "--effort tiny --train-size 600 --test-size 200 --attacks ''"


@pytest.fixture
def service_extra_env() -> dict[str, str]:
    return {"REFINE_AUDIT_LOG_FORMAT": "json"}


@pytest.fixture(scope="module")
def backdoored_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model, path, _ = train_tiny_backdoored_fmnist_model(tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("bd"))
    return model, path


def yaml_blocks(markdown: str) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", markdown, re.S)]


def github_gate_script() -> str:
    workflow = yaml_blocks(DOC.read_text())[0]
    steps = next(iter(workflow["jobs"].values()))["steps"]
    step = next(s for s in steps if s.get("name") == "Audit the model (gate)")
    assert step["env"]["REFINE_AUDIT_TOKEN"] == "${{ secrets.REFINE_AUDIT_TOKEN }}"
    return step["run"].replace("${{ vars.REFINE_AUDIT_SERVER }}", "$REFINE_AUDIT_SERVER")


def gitlab_gate_script() -> str:
    job = yaml_blocks(DOC.read_text())[1]["model-gate"]
    return next(line for line in job["script"] if line.startswith("refine-audit remote submit"))


def run_pipeline_step(script: str, workdir: Path, model: Path, service: Service) -> subprocess.CompletedProcess[str]:
    """Run a documented step in a checkout holding ``models/model.safetensors``, at CI effort."""
    assert "--effort quick" in script and "--fail-on suspicious" in script
    (workdir / "models").mkdir(parents=True)
    (workdir / "models" / "model.safetensors").write_bytes(model.read_bytes())
    env = {**service.env, "PATH": f"{BIN}:/usr/bin:/bin", "REFINE_AUDIT_SERVER": service.base_url,
           "REFINE_AUDIT_TOKEN": service.token}
    return subprocess.run(["bash", "-ec", script.replace("--effort quick", CI_EFFORT)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=AUDITS_S, stdin=subprocess.DEVNULL)


def scrape(service: Service) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{service.base_url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finished(samples: dict, status: str) -> float:
    return samples.get(("refine_audit_audits_finished_total", (("status", status),)), 0.0)


def test_documented_gates_close_on_a_backdoored_model_and_pass_a_clean_one_while_metrics_and_logs_follow(
    service: Service, fmnist_model, backdoored_model, tmp_path: Path,
) -> None:
    before = scrape(service)

    backdoored = run_pipeline_step(github_gate_script(), tmp_path / "github", backdoored_model[1], service)
    clean = run_pipeline_step(gitlab_gate_script(), tmp_path / "gitlab", fmnist_model[1], service)

    after = scrape(service)
    outputs = f"--- backdoored ---\n{backdoored.stderr}\n--- clean ---\n{clean.stderr}\n{service.logs()}"
    assert backdoored.returncode == 1, outputs
    assert clean.returncode == 0, outputs
    assert "gate CLOSED" in backdoored.stderr and "gate passed" in clean.stderr
    ids = {}
    for name, done in (("github", backdoored), ("gitlab", clean)):
        ids[name] = done.stdout.strip().splitlines()[0]
        report = json.loads((tmp_path / name / "audit-report" / "report.json").read_text())
        assert report["audit_id"] == ids[name] and report["status"] == "succeeded"
        assert (tmp_path / name / "audit-report" / "report.pdf").read_bytes().startswith(b"%PDF")
    # CI-sized audits are inconclusive (too few probe images for a verdict), so the gate reads the probes:
    verdict = json.loads((tmp_path / "github" / "audit-report" / "report.json").read_text())["verdict"]
    assert verdict["probe_level"] in ("suspicious", "likely_backdoored"), verdict

    # /metrics, answered by any of gunicorn's workers, counts both audits from the database.
    assert finished(after, "succeeded") == finished(before, "succeeded") + 2
    assert after[("refine_audit_audits_submitted_total", ())] == before[("refine_audit_audits_submitted_total", ())] + 2
    assert after[("refine_audit_stage_duration_seconds_count", (("stage", "refine"),))] >= 2
    assert after[("refine_audit_queue_depth", (("queue", "cpu"),))] == 0

    # The worker logs JSON, and the lines of each audit's run carry its id.
    lines = [json.loads(line) for line in service.worker.log_path.read_text().splitlines() if line.startswith("{")]
    for audit_id in ids.values():
        stage_lines = [e for e in lines if e["logger"].startswith("sandbox.auditor.pipeline") and e["audit_id"] == audit_id]
        assert {"stage data started", "stage refine started"} <= {e["message"] for e in stage_lines}, lines[-20:]
    pipeline_lines = [e for e in lines if e["logger"].startswith("sandbox.auditor.")]
    assert pipeline_lines and all(e["audit_id"] in ids.values() for e in pipeline_lines)
