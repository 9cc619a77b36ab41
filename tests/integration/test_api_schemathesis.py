"""The served API matches its OpenAPI document, whatever a client sends: schemathesis
against the live document, every check on, no server error and no mismatch allowed.

The app runs as deployed (gunicorn, PostgreSQL, a Redis broker) with a real token and a
finished audit whose report and files are what a run stores (``e2e.live_api``). The run
is bounded (``MAX_EXAMPLES`` per operation, about a minute here); ``python -m
bench.schemathesis_run`` is the long one. First, a test replays the report and every
artifact of the finished audit through schemathesis's checks, since random ids rarely
reach them: their content types and the report's JSON Schema are what the document says.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from shared_fixtures import service_missing

from e2e.live_api import LiveApi, live_api, schemathesis_args, summarize
from e2e.processes import BIN, REPO

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MAX_EXAMPLES = 25
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(tmp_path_factory.mktemp("live-api"), service_missing) as running:
        yield running


def test_the_finished_audit_serves_exactly_what_the_document_describes(api: LiveApi) -> None:
    """Runs before the fuzzing, which may delete the audit (an ended audit can be deleted)."""
    schema = schemathesis.openapi.from_url(api.openapi_url)
    audit = {"audit_id": api.finished_audit_id}

    listed = checked_call(api, schema, "/audits/{audit_id}/artifacts", audit).json()["items"]
    stored = {item["name"]: item["content_type"] for item in listed}
    served = {
        name: checked_call(api, schema, "/audits/{audit_id}/artifacts/{name}", {**audit, "name": name}).headers["content-type"][0]
        for name in stored
    }
    reports = [checked_call(api, schema, f"/audits/{{audit_id}}/report.{fmt}", audit) for fmt in ("json", "html", "pdf")]

    assert {name: value.split(";")[0] for name, value in served.items()} == stored
    assert set(stored.values()) == {"application/json", "text/html", "application/pdf", "image/png", "text/plain",
                                    "application/octet-stream", "application/zip"}
    assert [r.status_code for r in reports] == [200, 200, 200]
    assert reports[0].json()["audit_id"] == api.finished_audit_id


def test_schemathesis_finds_no_server_error_and_no_mismatch(api: LiveApi, tmp_path: Path) -> None:
    ndjson = tmp_path / "run.ndjson"

    run = subprocess.run(
        [str(BIN / "schemathesis"), *schemathesis_args(api.openapi_url, api.token, max_examples=MAX_EXAMPLES, seed=0,
                                                        ndjson=ndjson)],
        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    summary = summarize(ndjson)
    report = f"{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert run.returncode == 0, report
    assert (summary.server_errors, summary.schema_mismatches, summary.failures) == (0, 0, []), report
    assert summary.cases > 800, report  # every phase ran (about 1,200 cases), not only a handful of examples
    assert requests.get(f"{api.base_url}/api/v1/tokens", headers=bearer(api), timeout=30).status_code == 200  # not revoked
    assert "Traceback" not in api.server.log_path.read_text()


def checked_call(api: LiveApi, schema: schemathesis.BaseSchema, path: str, parameters: dict[str, str]) -> schemathesis.Response:
    """GET ``path`` with the token; every schemathesis check (content type, JSON Schema, status) must pass."""
    case = schema[path]["GET"].Case(path_parameters=parameters, headers=bearer(api))
    response = case.call(base_url=f"{api.base_url}/api/v1")
    case.validate_response(response)
    return response


def bearer(api: LiveApi) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.token}"}
