"""The Python client and ``refine-audit remote`` against the real web app over real HTTP.

The app runs on the migrated SQLite database with a local artifact store, served by
werkzeug on loopback; only the job queue is the recording fake of ``api_support``, so
audits stay queued and every state the client sees is one the API really returns. The
full loop with a worker is ``tests/e2e/test_ci_gate.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine
from werkzeug.serving import make_server

from api_support import TINY_SPEC, Api, ApiFactory, api_factory, checkpoint  # noqa: F401 (fixtures)

from auditor.cli import main
from auditor.client import RefineAuditClient, RemoteError, ServiceUnreachable, WaitTimeout, verdict_fails_gate
from auditor.remote_cli import EXIT_GATE_CLOSED, EXIT_PASSED, EXIT_REFUSED, EXIT_WAIT_TIMEOUT, _gate


@pytest.fixture
def served(sqlite_engine: Engine, api_factory: ApiFactory) -> Iterator[tuple[Api, str]]:
    api = api_factory(sqlite_engine)
    server = make_server("127.0.0.1", 0, api.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture
def client(served) -> RefineAuditClient:
    api, url = served
    return RefineAuditClient(url, api.token(), timeout_s=30)


def test_submit_read_cancel_and_download_through_the_client(client, checkpoint: bytes, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(checkpoint)

    created = client.submit_checkpoint(model, TINY_SPEC, idempotency_key="build-42")
    again = client.submit_checkpoint(model, TINY_SPEC, idempotency_key="build-42")
    seen = []
    with pytest.raises(WaitTimeout) as waited:
        client.wait(created["id"], on_progress=seen.append, poll_s=0, timeout_s=0, sleep=lambda _s: None)
    with pytest.raises(RemoteError) as not_ready:
        client.download_report(created["id"], tmp_path / "early")
    cancelled = client.cancel(created["id"])
    ended = client.wait(created["id"], poll_s=0)
    inputs = client.download_artifacts(created["id"], tmp_path / "files", kinds=["input"])

    assert created["status"] == "queued" and again["id"] == created["id"]
    assert seen and seen[-1]["status"] == "queued" and waited.value.code == "wait_timeout"
    assert (not_ready.value.code, not_ready.value.status) == ("report_not_ready", 409)
    assert cancelled["status"] == "cancelled" and ended["status"] == "cancelled"
    assert [p.read_bytes() for p in inputs] == [checkpoint]
    assert inputs[0] == (tmp_path / "files" / "inputs" / "model").resolve()


def test_errors_carry_the_services_code_and_status(served, client, tmp_path: Path) -> None:
    api, url = served
    with pytest.raises(RemoteError) as bad_spec:
        client.submit_api({"effort": "enormous"})
    with pytest.raises(RemoteError) as bad_token:
        RefineAuditClient(url, "ra_not-a-token").get("anything")
    with pytest.raises(RemoteError) as missing:
        client.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ServiceUnreachable):
        RefineAuditClient("http://127.0.0.1:9", "ra_x", timeout_s=2).get("x")

    assert (bad_spec.value.code, bad_spec.value.status, bad_spec.value.is_input_error) == ("invalid_spec", 422, True)
    assert "effort" in bad_spec.value.message and bad_spec.value.detail["fields"]
    assert (bad_token.value.code, bad_token.value.status) == ("unauthorized", 401)
    assert (missing.value.code, missing.value.status) == ("not_found", 404)


def test_remote_commands_submit_report_status_and_refuse_with_exit_codes(served, checkpoint: bytes, tmp_path: Path):
    api, url = served
    model = tmp_path / "model.safetensors"
    model.write_bytes(checkpoint)
    runner = CliRunner(env={"CI_TOKEN": api.token()})

    def remote(*args: str):
        return runner.invoke(main, ["remote", *args, "--server", url, "--token-env", "CI_TOKEN"], catch_exceptions=False)

    submitted = remote("submit", str(model), "--effort", "tiny", "--attacks", "badnets")
    audit_id = submitted.stdout.strip()
    status = remote("status", audit_id)
    timed_out = remote("submit", str(model), "--effort", "tiny", "--wait", "--timeout", "0", "--poll", "0", "--quiet")
    refused = remote("submit", "--api", "http://127.0.0.1:9/v1/models/m:predict", "--effort", "tiny",
                     "--query-budget", "5")
    cancelled = remote("cancel", audit_id)
    no_token = runner.invoke(main, ["remote", "status", audit_id, "--server", url, "--token-env", "UNSET_VAR"])

    assert submitted.exit_code == EXIT_PASSED, submitted.output
    detail = json.loads(status.stdout)
    assert detail["id"] == audit_id and detail["spec"]["effort"] == "tiny"
    assert detail["spec"]["controls"]["attacks"] == ["badnets"]
    assert timed_out.exit_code == EXIT_WAIT_TIMEOUT
    assert refused.exit_code == EXIT_REFUSED and "query_budget" in refused.stderr
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stderr
    assert no_token.exit_code == 2 and "UNSET_VAR" in no_token.output


@pytest.mark.parametrize(("verdict", "probe_level", "fail_on", "closed"), [
    ("no_evidence", "no_evidence", ("suspicious",), False),
    ("suspicious", "suspicious", ("suspicious",), True),
    ("likely_backdoored", "likely_backdoored", ("suspicious",), True),
    ("suspicious", "suspicious", ("likely_backdoored",), False),
    ("likely_backdoored", "likely_backdoored", ("likely_backdoored",), True),
    ("inconclusive", "no_evidence", ("suspicious",), False),
    ("inconclusive", "no_evidence", ("suspicious", "inconclusive"), True),
    # an inconclusive audit whose probes read a backdoor never passes a gate that fails on that reading
    ("inconclusive", "likely_backdoored", ("suspicious",), True),
    ("inconclusive", "suspicious", ("likely_backdoored",), False),
    ("a_level_from_the_future", None, ("likely_backdoored",), True),
])
def test_gate_closes_on_the_requested_levels(verdict: str, probe_level: str | None, fail_on: tuple[str, ...],
                                             closed: bool) -> None:
    assert verdict_fails_gate(verdict, fail_on, probe_level) is closed
    audit = {"id": "a", "status": "succeeded",
             "summary": {"verdict": verdict, "probe_level": probe_level, "headline": ""}}
    assert _gate(audit, fail_on) == (EXIT_GATE_CLOSED if closed else EXIT_PASSED)
