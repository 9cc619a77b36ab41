"""A running API for tools that test it from the outside, and the schemathesis run against it.

``live_api`` starts gunicorn (``web.wsgi:app``) on a PostgreSQL database of its own, a
claimed Redis database as the broker (no worker consumes it: submissions stay queued)
and a local artifact folder; it signs up a user with an API token and gives that user
one finished audit with a real report (JSON, HTML, PDF, plots) and stored inputs, so
the report and artifact routes have something to serve.

``schemathesis_args`` is the command both ``tests/integration/test_api_schemathesis.py``
(in CI) and ``bench/schemathesis_run.py`` (a longer run) execute from the repository
root, where ``schemathesis.toml`` completes it; ``summarize`` reads its NDJSON report.
"""

from __future__ import annotations

import json
import mimetypes
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from auditor.report import write_report
from auditor.store import audits, users
from auditor.store.artifacts import LocalStore, audit_prefix
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from e2e.processes import ServiceProcess, free_port, service_env, start_gunicorn, wait_for
from shared_fixtures import claimed_redis_db, throwaway_database
from unit.report_sample import sample_grids, sample_report

REDIS_URL = os.environ.get("REFINE_AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
STARTUP_S = 180  # gunicorn imports torch; slow on two busy cores
#: Checks that compare a response with the document.
CONFORMANCE_CHECKS = frozenset(
    {"status_code_conformance", "content_type_conformance", "response_schema_conformance", "response_headers_conformance"}
)
#: Inputs as the submission service stores them, beside what the pipeline writes.
SEEDED_INPUTS = {"inputs/model": ("application/octet-stream", b"\x00weights"), "inputs/dataset": ("application/zip", b"PK\x05\x06" + bytes(18))}


@dataclass(frozen=True)
class LiveApi:
    base_url: str  # e.g. http://127.0.0.1:40123
    token: str
    finished_audit_id: str
    server: ServiceProcess

    @property
    def openapi_url(self) -> str:
        return f"{self.base_url}/api/v1/openapi.json"


@contextmanager
def live_api(work_dir: Path, on_missing: Callable[[str], None]) -> Iterator[LiveApi]:
    """The service on its own database, broker database and artifact folder, torn down afterwards."""
    with throwaway_database("refine_audit_live_", on_missing) as database_url, \
            claimed_redis_db(REDIS_URL, on_missing) as broker_url:
        upgrade_database(database_url)
        artifacts = work_dir / "artifacts"
        token, audit_id = _seed(database_url, LocalStore(artifacts), work_dir / "report")
        port = free_port()
        env = service_env({
            "REFINE_AUDIT_ENV": "test",
            "REFINE_AUDIT_DATA_DIR": str(work_dir / "data"),
            "REFINE_AUDIT_DATABASE_URL": database_url,
            "REFINE_AUDIT_BROKER_URL": broker_url,
            "REFINE_AUDIT_ARTIFACTS": f"file://{artifacts}",
            "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
            "REFINE_AUDIT_SECRET_KEY": uuid.uuid4().hex * 2,
            "REFINE_AUDIT_MAX_UPLOAD_MB": "5",
        })
        server = start_gunicorn("web.wsgi:app", env, work_dir / "gunicorn.log", bind=f"127.0.0.1:{port}")
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _healthy(base_url), STARTUP_S, message="gunicorn to answer /api/v1/health", process=server)
            yield LiveApi(base_url, token, audit_id, server)
        finally:
            server.stop()


def _seed(database_url: str, store: LocalStore, report_dir: Path) -> tuple[str, str]:
    """A user with a token and one succeeded audit whose files are what a real run stores."""
    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            user = users.create_user(session, "fuzz@example.com", "fuzz-password-123")
            _, token = users.create_token(session, user.id, "schemathesis")
            audit, _ = audits.create_audit(session, owner_id=user.id, spec={"effort": "tiny"}, seed=0)
            audits.mark_running(session, audit.id)
            report = {**sample_report(), "audit_id": audit.id}
            files = {name: (mimetypes.guess_type(name)[0], path.read_bytes())
                     for name, path in write_report(report, report_dir, images=sample_grids()).items()}
            files |= SEEDED_INPUTS
            files["defense.json"] = ("application/json", json.dumps({"mapping": list(range(10))}).encode())
            files["audit.log"] = ("text/plain", b"seeded audit\n")
            for name, (content_type, payload) in files.items():
                info = store.put(audit_prefix(audit.id) + name, payload, content_type)
                kind = "input" if name.startswith("inputs/") else "report"
                audits.add_artifact(session, audit.id, name=name, info=info, kind=kind, content_type=content_type)
            audits.mark_succeeded(session, audit.id, {"status": "succeeded", "verdict": "likely_backdoored"})
            return token, audit.id
    finally:
        engine.dispose()


def _healthy(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/api/v1/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def schemathesis_args(openapi_url: str, token: str, *, max_examples: int, seed: int | None = None,
                      ndjson: Path | None = None) -> list[str]:
    """``schemathesis`` arguments: every check, every phase (examples, coverage, fuzzing,
    stateful through the document's links), positive and negative data; the
    ``schemathesis.toml`` of the working directory adds the hooks and settings."""
    args = ["run", openapi_url, "--header", f"Authorization: Bearer {token}", "--checks", "all", "--mode", "all",
            "--max-examples", str(max_examples)]
    if seed is not None:
        args += ["--seed", str(seed)]
    if ndjson is not None:
        args += ["--report", "ndjson", "--report-ndjson-path", str(ndjson), "--no-color"]
    return args


@dataclass(frozen=True)
class RunSummary:
    cases: int
    responses: dict[str, int]  # status code -> count
    failures: list[dict[str, str]]  # {"check", "operation", "title"} per failed check

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.responses.items() if status.startswith("5"))

    @property
    def schema_mismatches(self) -> int:
        return sum(1 for failure in self.failures if failure["check"] in CONFORMANCE_CHECKS)


def summarize(ndjson: Path) -> RunSummary:
    """Cases, response statuses and failed checks of a run, from its NDJSON event stream."""
    cases: set[str] = set()
    responses: dict[str, int] = {}
    failures = []
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder")
        if recorder is None:
            continue
        cases |= set(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            status = str((interaction.get("response") or {}).get("status_code", "no response"))
            responses[status] = responses.get(status, 0) + 1
        for checks in recorder.get("checks", {}).values():
            failures += [
                {"check": c["name"], "operation": recorder["label"],
                 "title": c.get("failure_info", {}).get("failure", {}).get("title", "")}
                for c in checks if c["status"] == "failure"
            ]
    return RunSummary(len(cases), dict(sorted(responses.items())), failures)
