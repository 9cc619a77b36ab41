"""HTTP routes of the audits resource: parse the request, call ``service``, serialize.

Every route is owner-scoped: another user's audit answers 404 exactly like a missing
one, so ids cannot be probed.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from flask import Blueprint, Response, redirect, request
from werkzeug.datastructures import FileStorage

from auditor.errors import AuditError, ErrorCode
from auditor.report.schema import report_json_schema
from auditor.store.models import Artifact
from web.api.audits import service
from web.api.audits.schemas import (
    ARTIFACT_FILE_TYPES,
    REPORT_FORMATS,
    REPORT_MEDIA_TYPES,
    ArtifactList,
    ArtifactOut,
    AuditCreated,
    AuditDetail,
    AuditItem,
    AuditPage,
    AuditSubmission,
    DownloadQuery,
    EventList,
    EventOut,
    ListQuery,
    PlanPreview,
    SubmitReply,
)
from web.api.common import parse_query, reply
from web.api.registry import Body, Header, Link, Reply, operation
from web.auth import current_token_id, current_user_id
from web.inputs import FORM_ALLOWANCE, MIB

bp = Blueprint("audits", __name__)

UPLOAD_FIELDS = ("model", "dataset")
MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "contentMediaType": "application/octet-stream",
                  "description": "The checkpoint: TorchScript, torch.export .pt2, safetensors or a zip state dict."},
        "dataset": {"type": "string", "contentMediaType": "application/zip",
                    "description": "Optional .npz (x, y) or zip of class folders; needs data.source 'upload'."},
        "spec": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": "#/components/schemas/AuditSubmission"},
                 "description": "The AuditSpec as a JSON string (a form field or a file part); "
                                "\"dry_run\": true in it asks for the plan only."},
    },
}
AUDIT_LINK = {"Location": "URL of the audit."}
#: Operations on one audit, reachable from any reply that names its id.
PER_AUDIT_OPERATIONS = ("get_audit", "list_events", "cancel_audit", "delete_audit", "list_artifacts",
                        *(f"report_{fmt}" for fmt in REPORT_FORMATS))


def links_to_audit(audit_id: str) -> tuple[Link, ...]:
    """OpenAPI links from a reply to every per-audit operation, ``audit_id`` given as a runtime expression."""
    return tuple(Link(f"audits.{name}", {"audit_id": audit_id}) for name in PER_AUDIT_OPERATIONS)


@operation(
    bp, "POST", "/audits",
    summary="Submit an audit",
    body=Body(
        {"multipart/form-data": MULTIPART_SCHEMA, "application/json": AuditSubmission},
        "A checkpoint upload (multipart) or, for a model behind an API or in MLflow (model.mlflow), the AuditSpec "
        "as JSON. With \"dry_run\": true the submission is checked and planned but not stored: the reply is its plan.",
    ),
    replies={
        202: Reply("Accepted and queued.", AuditCreated, headers=AUDIT_LINK, links=links_to_audit("$response.body#/id")),
        200: Reply("A dry run's plan (PlanPreview), or, when the Idempotency-Key was used before, the earlier "
                   "audit (AuditCreated), not queued again.", SubmitReply),
    },
    errors=(400, 413, 415, 422, 502, 503),
    headers={"Idempotency-Key": Header("Optional; a retry with the same key returns the first audit (200) instead of a new one.",
                                       max_length=service.MAX_IDEMPOTENCY_KEY_LENGTH)},
)
def create_audit() -> Response:
    """Validates the spec, the uploads and every outbound URL, and plans the audit, before
    anything is stored, so a bad or unaffordable submission is refused at once; send an
    ``Idempotency-Key`` header to make retries safe, or ``"dry_run": true`` to see the plan
    (sizes, query split, time estimate) without submitting."""
    submission = _read_submission()
    if submission.dry_run:
        return reply(PlanPreview.from_plan(service.preview_audit(submission)))
    audit, created = service.submit_audit(current_user_id(), submission, token_id=current_token_id())
    body = AuditCreated.from_row(audit)
    return reply(body, 202 if created else 200, {"Location": body.links.self})


@operation(bp, "GET", "/audits", summary="List your audits", query=ListQuery,
           replies={200: Reply("Newest first.", AuditPage, links=links_to_audit("$response.body#/items/0/id"))},
           errors=(422,))
def list_audits() -> Response:
    query = parse_query(ListQuery)
    page = service.list_owned(current_user_id(), query.status, query.limit, query.offset)
    items = [AuditItem.from_row(audit) for audit in page.items]
    return reply(AuditPage(items=items, total=page.total, limit=page.limit, offset=page.offset))


@operation(bp, "GET", "/audits/<audit_id>", summary="Get an audit",
           replies={200: Reply("Status, stage, progress, summary and links.", AuditDetail)}, errors=(404,))
def get_audit(audit_id: str) -> Response:
    return reply(AuditDetail.from_row(service.get_owned(current_user_id(), audit_id)))


@operation(bp, "GET", "/audits/<audit_id>/events", summary="The audit's stage log",
           replies={200: Reply("Oldest first.", EventList)}, errors=(404,))
def list_events(audit_id: str) -> Response:
    events = service.events_of(current_user_id(), audit_id)
    return reply(EventList(items=[EventOut.from_row(event) for event in events]))


@operation(bp, "POST", "/audits/<audit_id>/cancel", summary="Cancel an audit",
           replies={202: Reply("Cancelled (queued) or asked to stop (running).", AuditDetail)}, errors=(404, 409))
def cancel_audit(audit_id: str) -> Response:
    """A queued audit is cancelled at once; a running one stops at its next batch."""
    return reply(AuditDetail.from_row(service.cancel(current_user_id(), audit_id)), 202)


@operation(bp, "DELETE", "/audits/<audit_id>", summary="Delete an ended audit and its files",
           replies={204: Reply("Deleted.")}, errors=(404, 409))
def delete_audit(audit_id: str) -> Response:
    """Only ended audits can be deleted (409 ``conflict`` otherwise: cancel first), so a
    worker never writes files for a row that is gone."""
    service.delete(current_user_id(), audit_id)
    return Response(status=204)


@operation(bp, "GET", "/audits/<audit_id>/artifacts", summary="List the audit's files",
           replies={200: Reply("Inputs, reports, models, plots and logs.", ArtifactList, links=(
               Link("audits.download_artifact", {"audit_id": "$request.path.audit_id", "name": "$response.body#/items/0/name"}),
           ))}, errors=(404,))
def list_artifacts(audit_id: str) -> Response:
    artifacts = service.artifacts_of(current_user_id(), audit_id)
    return reply(ArtifactList(items=[ArtifactOut.from_row(a) for a in artifacts]))


@operation(bp, "GET", "/audits/<audit_id>/artifacts/<path:name>", summary="Download one file",
           query=DownloadQuery,
           replies={200: Reply("The file, with the content type it was stored with (ArtifactOut.content_type).",
                               json_schema={"type": "object"}, files=ARTIFACT_FILE_TYPES),
                    302: Reply("With ?redirect=1 on S3 stores: a presigned URL valid for 15 minutes.")},
           errors=(404, 422))
def download_artifact(audit_id: str, name: str) -> Response:
    query = parse_query(DownloadQuery)
    artifact = service.artifact_of(current_user_id(), audit_id, name)
    url = service.presigned_url(artifact) if query.redirect else None
    return redirect(url, 302) if url else stream_artifact(artifact, attachment=True)


def _report_view(fmt: str):
    def view(audit_id: str) -> Response:
        return stream_artifact(service.report_of(current_user_id(), audit_id, fmt), attachment=fmt == "pdf")

    view.__name__ = f"report_{fmt}"
    view.__doc__ = "Streamed from the artifact store; 409 ``report_not_ready`` until the audit has ended."
    return view


REPORT_REPLIES = {
    "json": Reply("The report.json contract (docs/report.schema.json).", json_schema=report_json_schema()),
    "html": Reply("The report as a self-contained page.", files=(REPORT_MEDIA_TYPES["html"],)),
    "pdf": Reply("The report as a PDF.", files=(REPORT_MEDIA_TYPES["pdf"],)),
}
for _fmt in REPORT_FORMATS:
    operation(bp, "GET", f"/audits/<audit_id>/report.{_fmt}", summary=f"The report as {_fmt.upper()}",
              replies={200: REPORT_REPLIES[_fmt]}, errors=(404, 409))(_report_view(_fmt))


# --- parsing and streaming helpers -----------------------------------------------------------


def _read_submission() -> service.Submission:
    """Multipart (files + a ``spec`` JSON string) or a JSON AuditSpec; nothing else."""
    key = request.headers.get("Idempotency-Key")
    if request.mimetype == "multipart/form-data":
        files = {name: f for name in UPLOAD_FIELDS if (f := request.files.get(name)) is not None and f.filename}
        spec = _spec_from_form()
        return service.Submission(spec, files, key, dry_run=pop_dry_run(spec))
    if request.is_json:
        body = request.get_json()
        if not isinstance(body, dict):
            raise _bad_spec("(root)", "must be a JSON object (an AuditSpec)")
        return service.Submission(body, {}, key, dry_run=pop_dry_run(body))
    raise AuditError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        "Send multipart/form-data (with a model file) or application/json (an AuditSpec for a model API or an "
        "MLflow model).",
        {"content_type": request.mimetype},
    )


def _spec_from_form() -> dict[str, Any] | None:
    """The ``spec`` part, as a form field or a file (``curl -F spec=@spec.json``); absent = defaults."""
    upload: FileStorage | None = request.files.get("spec")
    raw = _read_spec_file(upload) if upload is not None else request.form.get("spec")
    if raw is None or not raw.strip():
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _bad_spec("spec", f"not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise _bad_spec("spec", "must be a JSON object")
    return spec


def _read_spec_file(upload: FileStorage) -> str:
    """A spec sent as a file part gets the same room as a form field, never a file's limit."""
    raw = upload.read(FORM_ALLOWANCE + 1)
    if len(raw) > FORM_ALLOWANCE:
        raise AuditError(ErrorCode.PAYLOAD_TOO_LARGE, f"spec: larger than {FORM_ALLOWANCE // MIB} MiB.",
                         {"field": "spec", "max_bytes": FORM_ALLOWANCE})
    return raw.decode("utf-8", "replace")


def pop_dry_run(spec: dict[str, Any] | None) -> bool:
    """Take ``dry_run`` out of a submitted spec (it asks for the plan; it is not part of the audit)."""
    value = spec.pop("dry_run", False) if spec is not None else False
    if not isinstance(value, bool):
        raise _bad_spec("dry_run", "must be true or false")
    return value


def _bad_spec(field: str, message: str) -> AuditError:
    return AuditError(ErrorCode.INVALID_SPEC, f"{field}: {message}", {"fields": [{"field": field, "message": message}]})


def stream_artifact(artifact: Artifact, *, attachment: bool) -> Response:
    """Stream from the store in chunks, so large models never sit in the web process's memory.

    HTML is served sandboxed (no scripts, no same-origin access), because it comes from
    our store but is rendered on our origin.
    """
    response = Response(service.open_artifact(artifact), mimetype=artifact.content_type)
    response.content_length = artifact.size
    response.set_etag(artifact.sha256)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if artifact.content_type.startswith("text/html"):
        response.headers["Content-Security-Policy"] = "sandbox"
    if attachment:
        filename = PurePosixPath(artifact.name).name
        response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
