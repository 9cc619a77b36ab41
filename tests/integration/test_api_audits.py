"""The audits resource end to end through Flask, on SQLite and PostgreSQL: submission,
idempotency, listing, cancel, delete, reports and artifact downloads."""

from __future__ import annotations

import hashlib
import json

from api_support import TINY_SPEC, Api, api, api_factory, api_spec, auth, checkpoint  # noqa: F401 (fixtures)

from auditor.store import audits
from auditor.store.artifacts import audit_prefix
from auditor.store.db import make_session_factory, session_scope

REPORT = {"status": "succeeded", "verdict": {"level": "no_evidence"}}


def finish_audit(api: Api, audit_id: str) -> None:
    """Play the worker's part: run, write the three reports, succeed."""
    files = {
        "report.json": (json.dumps(REPORT).encode(), "application/json"),
        "report.html": (b"<html><body>report</body></html>", "text/html"),
        "report.pdf": (b"%PDF-1.4 tiny", "application/pdf"),
    }
    with session_scope(make_session_factory(api.engine)) as session:
        audits.mark_running(session, audit_id)
        for name, (payload, content_type) in files.items():
            info = api.store.put(audit_prefix(audit_id) + name, payload, content_type)
            audits.add_artifact(session, audit_id, name=name, info=info, kind="report", content_type=content_type)
        audits.mark_succeeded(session, audit_id, {"status": "succeeded", "verdict": "no_evidence"})


def start_audit(api: Api, audit_id: str) -> None:
    with session_scope(make_session_factory(api.engine)) as session:
        audits.mark_running(session, audit_id)


def test_checkpoint_upload_is_stored_committed_then_enqueued(api: Api, checkpoint: bytes) -> None:
    token = api.token()

    response = api.submit(token, checkpoint, TINY_SPEC)

    assert response.status_code == 202, response.json
    body = response.json
    assert body["status"] == "queued"
    assert set(body["links"]) == {"self", "cancel", "events", "artifacts", "report_json", "report_html", "report_pdf"}
    assert response.headers["Location"] == body["links"]["self"] == f"/api/v1/audits/{body['id']}"
    assert api.queue.sent == [(body["id"], "cpu")]  # RecordingQueue saw the committed row
    assert api.store.get_bytes(f"audits/{body['id']}/inputs/model") == checkpoint
    detail = api.client.get(body["links"]["self"], headers=auth(token)).json
    assert (detail["status"], detail["progress"], detail["spec"]["effort"]) == ("queued", 0.0, "tiny")
    listed = api.client.get(body["links"]["artifacts"], headers=auth(token)).json["items"]
    assert [(a["name"], a["kind"], a["sha256"]) for a in listed] == [
        ("inputs/model", "input", hashlib.sha256(checkpoint).hexdigest())
    ]


def test_same_idempotency_key_gives_one_audit_enqueued_once(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    key = {"Idempotency-Key": "retry-me"}

    first = api.submit(token, checkpoint, TINY_SPEC, headers=key)
    again = api.submit(token, checkpoint, TINY_SPEC, headers=key)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["id"] == first.json["id"]
    assert api.queue.ids == [first.json["id"]]
    assert api.client.get("/api/v1/audits", headers=auth(token)).json["total"] == 1


def test_model_api_audit_is_accepted_as_json_and_its_secret_never_shown(api: Api) -> None:
    token = api.token()

    response = api.submit_json(token, api_spec())

    assert response.status_code == 202, response.json
    detail = api.client.get(response.json["links"]["self"], headers=auth(token)).json
    assert detail["spec"]["model"]["api"]["auth_value"] == "***"
    assert "s3cret" not in json.dumps(detail)


def test_list_pages_newest_first_and_filters_by_status(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    ids = [api.submit(token, checkpoint, TINY_SPEC).json["id"] for _ in range(3)]
    api.client.post(f"/api/v1/audits/{ids[0]}/cancel", headers=auth(token))

    first = api.client.get("/api/v1/audits?limit=2", headers=auth(token)).json
    second = api.client.get("/api/v1/audits?limit=2&offset=2", headers=auth(token)).json
    cancelled = api.client.get("/api/v1/audits?status=cancelled", headers=auth(token)).json
    queued = api.client.get("/api/v1/audits?status=queued", headers=auth(token)).json

    assert (first["total"], first["limit"], first["offset"]) == (3, 2, 0)
    assert [a["id"] for a in first["items"] + second["items"]] == ids[::-1]
    assert [a["id"] for a in cancelled["items"]] == [ids[0]]
    assert {a["id"] for a in queued["items"]} == set(ids[1:])


def test_list_refuses_bad_query_parameters(api: Api) -> None:
    token = api.token()
    for query in ("limit=0", "limit=101", "offset=-1", "offset=9223372036854775808", "status=exploded", "limti=2"):
        response = api.client.get(f"/api/v1/audits?{query}", headers=auth(token))
        assert response.status_code == 422, query
        assert response.json["error"]["code"] == "invalid_request"


def test_cancel_of_a_queued_audit_cancels_it_and_logs_it(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json

    response = api.client.post(audit["links"]["cancel"], headers=auth(token))
    again = api.client.post(audit["links"]["cancel"], headers=auth(token))

    assert response.status_code == 202
    assert response.json["status"] == "cancelled" and response.json["finished_at"] is not None
    assert again.status_code == 202 and again.json["status"] == "cancelled"
    events = api.client.get(audit["links"]["events"], headers=auth(token)).json["items"]
    assert [(e["kind"], e["data"]["to"]) for e in events] == [("status", "queued"), ("status", "cancelled")]


def test_cancel_of_a_running_audit_flags_it_for_the_worker(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    start_audit(api, audit["id"])

    response = api.client.post(audit["links"]["cancel"], headers=auth(token))

    assert response.status_code == 202
    assert (response.json["status"], response.json["cancel_requested"]) == ("running", True)


def test_cancel_of_a_finished_audit_is_a_conflict(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    finish_audit(api, audit["id"])

    response = api.client.post(audit["links"]["cancel"], headers=auth(token))

    assert response.status_code == 409
    assert response.json["error"]["code"] == "conflict"


def test_reports_wait_for_the_end_then_stream_from_the_store(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    links = audit["links"]

    not_ready = api.client.get(links["report_json"], headers=auth(token))
    finish_audit(api, audit["id"])
    as_json = api.client.get(links["report_json"], headers=auth(token))
    as_html = api.client.get(links["report_html"], headers=auth(token))
    as_pdf = api.client.get(links["report_pdf"], headers=auth(token))

    assert not_ready.status_code == 409
    assert not_ready.json["error"]["code"] == "report_not_ready"
    assert as_json.status_code == 200 and as_json.json == REPORT
    assert as_html.mimetype == "text/html" and as_html.headers["Content-Security-Policy"] == "sandbox"
    assert as_pdf.data.startswith(b"%PDF") and "attachment" in as_pdf.headers["Content-Disposition"]
    detail = api.client.get(links["self"], headers=auth(token)).json
    assert (detail["status"], detail["progress"], detail["summary"]["verdict"]) == ("succeeded", 1.0, "no_evidence")


def test_a_cancelled_audit_that_never_ran_has_no_report(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    api.client.post(audit["links"]["cancel"], headers=auth(token))

    response = api.client.get(audit["links"]["report_pdf"], headers=auth(token))

    assert response.status_code == 404 and response.json["error"]["code"] == "not_found"


def test_artifact_download_streams_the_bytes_with_their_hash(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    listed = api.client.get(audit["links"]["artifacts"], headers=auth(token)).json["items"]

    download = api.client.get(listed[0]["links"]["download"], headers=auth(token))
    redirected = api.client.get(listed[0]["links"]["download"] + "?redirect=1", headers=auth(token))
    missing = api.client.get(f"/api/v1/audits/{audit['id']}/artifacts/nope.bin", headers=auth(token))

    assert download.status_code == 200 and download.data == checkpoint
    assert download.headers["ETag"].strip('"') == listed[0]["sha256"]
    assert redirected.status_code == 200 and redirected.data == checkpoint  # a local store cannot presign
    assert missing.status_code == 404


def test_delete_removes_files_then_row_and_refuses_unfinished_audits(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    url = audit["links"]["self"]

    refused = api.client.delete(url, headers=auth(token))
    finish_audit(api, audit["id"])
    deleted = api.client.delete(url, headers=auth(token))

    assert refused.status_code == 409 and refused.json["error"]["detail"]["status"] == "queued"
    assert deleted.status_code == 204
    assert api.client.get(url, headers=auth(token)).status_code == 404
    assert api.store.list(audit_prefix(audit["id"])) == []


def test_dry_run_answers_the_plan_and_stores_nothing(api: Api, checkpoint: bytes) -> None:
    token = api.token()

    as_json = api.submit_json(token, api_spec(dry_run=True, effort="standard"))
    multipart = api.submit(token, checkpoint, {**TINY_SPEC, "dry_run": True})

    assert (as_json.status_code, multipart.status_code) == (200, 200), (as_json.json, multipart.json)
    plan = as_json.json["plan"]
    assert as_json.json["dry_run"] is True and plan["source"] == "api" and plan["effort"] == "standard"
    queries = plan["queries"]
    assert queries["budget"] == 30_000  # the spec's default, split so every part is sound
    assert queries["distillation"] >= 6000 and queries["evaluation"] == 2 * plan["data"]["test_images"] == 4802
    assert sum(queries[k] for k in ("distillation", "refits", "evaluation", "probes", "unallocated")) == 30_000
    assert as_json.json["estimated_seconds"] > 0
    assert as_json.json["description"][0][0] == "Effort" and as_json.json["description"][0][1].startswith("standard")
    assert multipart.json["plan"]["source"] == "checkpoint" and multipart.json["plan"]["effort"] == "tiny"
    assert api.client.get("/api/v1/audits", headers=auth(token)).json["total"] == 0
    assert api.queue.ids == [] and api.store.list("audits/") == []


def test_a_budget_too_small_for_a_sound_plan_is_refused_before_anything_is_stored(api: Api) -> None:
    token = api.token()
    spec = api_spec(effort="standard")
    spec["model"]["api"]["query_budget"] = 10_000

    for dry_run in (True, False):
        response = api.submit_json(token, {**spec, "dry_run": dry_run})
        assert response.status_code == 422, response.json
        error = response.json["error"]
        assert error["code"] == "insufficient_query_budget"
        assert error["detail"]["needed"] > 10_000 and "model.api.query_budget" in error["message"]
    assert api.client.get("/api/v1/audits", headers=auth(token)).json["total"] == 0
    assert api.queue.ids == []


def test_dry_run_must_be_a_boolean(api: Api) -> None:
    response = api.submit_json(api.token(), api_spec(dry_run="yes"))
    assert response.status_code == 422
    assert response.json["error"]["detail"]["fields"][0]["field"] == "dry_run"
