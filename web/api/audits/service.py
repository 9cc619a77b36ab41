"""What the audit routes do, free of HTTP: every function takes the owner's id and
plain values and returns rows, raising ``AuditError`` for anything a client must hear.

Submission order matters (STYLE §7): validate everything first, store the uploads,
commit the row, and only then enqueue, so a worker can never receive the id of a row
or an input file that does not exist yet.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from auditor.errors import AuditError, ErrorCode
from auditor.pipeline import FASHION_MNIST, AuditPlan, plan_audit
from auditor.pipeline.data import summarize_upload
from auditor.settings import Settings
from auditor.spec import AuditSpec, parse_spec
from auditor.store import audits
from auditor.store.artifacts import ArtifactStore, audit_prefix, input_key, input_name
from auditor.store.audits import Page
from auditor.store.lifecycle import AuditStatus, is_terminal
from auditor.store.models import Artifact, Audit, AuditEvent
from web.api.audits.uploads import (
    check_checkpoint,
    check_dataset,
    check_files_match_spec,
    check_mlflow_source,
    check_urls,
)
from web.context import db_session, services
from web.errors import not_found
from web.inputs import refuse_unstorable

log = logging.getLogger(__name__)

INPUT_CONTENT_TYPES = {"model": "application/octet-stream", "dataset": "application/zip"}
MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass
class Submission:
    """A parsed POST /audits: the raw spec and the uploaded files, not yet validated."""

    spec: dict[str, Any] | None
    files: dict[str, FileStorage]  # "model" and/or "dataset"
    idempotency_key: str | None = None
    dry_run: bool = False  # only plan: nothing is stored or queued


# --- submit -------------------------------------------------------------------------------


def submit_audit(owner_id: int, submission: Submission, *, token_id: int | None = None) -> tuple[Audit, bool]:
    """Validate, plan, store and queue a new audit; returns ``(audit, created)``.

    ``created`` is False when the idempotency key was used before: the earlier audit is
    returned and nothing is stored or enqueued again. A spec that cannot be planned
    soundly (e.g. ``insufficient_query_budget``) is refused before anything is stored.
    ``token_id`` is the API token that submitted it (None from the portal); its secret
    signs the completion webhook.
    """
    settings, session = services().settings, db_session()
    spec = _checked_spec(submission, settings)
    with tempfile.TemporaryDirectory(prefix="refine-audit-upload-") as tmp:
        paths = _save_uploads(submission.files, Path(tmp))
        plan_upload(spec, paths, settings)
        audit, created = audits.create_audit(
            session,
            owner_id=owner_id,
            spec=spec.model_dump(mode="json"),
            seed=spec.seed,
            queue=choose_queue(settings),
            idempotency_key=submission.idempotency_key,
            token_id=token_id,
        )
        if not created:
            return audit, False
        _store_inputs(session, services().store, audit.id, paths)
        session.commit()
    _enqueue(session, audit)
    return audit, True


def preview_audit(submission: Submission) -> AuditPlan:
    """A dry run: every check of a submission, then the plan; nothing is stored or queued."""
    settings = services().settings
    spec = _checked_spec(submission, settings)
    with tempfile.TemporaryDirectory(prefix="refine-audit-upload-") as tmp:
        return plan_upload(spec, _save_uploads(submission.files, Path(tmp)), settings)


def _checked_spec(submission: Submission, settings: Settings) -> AuditSpec:
    """The spec, validated against the uploads and the SSRF guard; a dry run may leave the model file out."""
    refuse_unstorable(submission.spec)  # a spec decoded from a form part or the portal's JSON field
    spec = parse_spec(submission.spec)
    _check_idempotency_key(submission.idempotency_key)
    uploaded_later = submission.dry_run and spec.model.source == "checkpoint" and spec.model.mlflow is None
    has_model = "model" in submission.files or uploaded_later
    check_files_match_spec(spec, has_model=has_model, has_dataset="dataset" in submission.files)
    check_mlflow_source(spec, settings.mlflow_tracking_uri)
    check_urls(spec, settings.allowed_hosts)
    return spec


def plan_upload(spec: AuditSpec, paths: dict[str, Path], settings: Settings) -> AuditPlan:
    """Check the uploaded files and resolve the audit's plan from the data's size, shape and classes.

    The web process never loads a submitted model to plan: sizes are all a plan needs.
    It plans for the worker's device class (``REFINE_AUDIT_DEVICE``); the worker plans
    again on its own hardware, which may change bf16 and the time estimate, never a size.
    """
    if "model" in paths:
        check_checkpoint(paths["model"])
    summary = FASHION_MNIST
    if "dataset" in paths:
        summary = summarize_upload(check_dataset(paths["dataset"], settings.max_upload_bytes), spec.data.test_fraction)
    return plan_audit(spec, summary, device="cuda" if settings.device == "cuda" else "cpu")


def choose_queue(settings: Settings) -> str:
    """``gpu`` when the operator runs GPU workers (``REFINE_AUDIT_DEVICE=cuda``), else ``cpu``."""
    return "gpu" if settings.device == "cuda" else "cpu"


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise AuditError(
            ErrorCode.INVALID_REQUEST,
            f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
            {"field": "Idempotency-Key"},
        )


def _save_uploads(files: dict[str, FileStorage], folder: Path) -> dict[str, Path]:
    paths = {}
    for name, upload in files.items():
        paths[name] = folder / name
        upload.save(paths[name])
    return paths


def _store_inputs(session: Session, store: ArtifactStore, audit_id: str, paths: dict[str, Path]) -> None:
    """Upload the inputs and record them; on failure remove what was uploaded (the row rolls back)."""
    try:
        for name, path in paths.items():
            info = store.put(input_key(audit_id, name), path, INPUT_CONTENT_TYPES[name])
            audits.add_artifact(
                session, audit_id, name=input_name(name), info=info, kind="input", content_type=INPUT_CONTENT_TYPES[name]
            )
    except BaseException:
        store.delete_prefix(audit_prefix(audit_id))
        raise


def _enqueue(session: Session, audit: Audit) -> None:
    """Hand the committed audit to the queue; if the broker is down, fail the audit visibly."""
    try:
        services().queue.enqueue(audit.id, audit.queue)
    except Exception as exc:
        log.exception("could not enqueue audit %s", audit.id)
        audits.mark_failed(session, audit.id, ErrorCode.SERVICE_UNAVAILABLE, "The job queue was unreachable.")
        session.commit()
        raise AuditError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "The audit could not be queued; try again later with a new Idempotency-Key.",
            {"audit_id": audit.id},
        ) from exc


# --- read ---------------------------------------------------------------------------------


def get_owned(owner_id: int, audit_id: str) -> Audit:
    """The owner's audit; another owner's audit is indistinguishable from a missing one."""
    audit = audits.get_audit_for_owner(db_session(), audit_id, owner_id)
    if audit is None:
        raise not_found("audit")
    return audit


def list_owned(owner_id: int, status: str | None, limit: int, offset: int) -> Page:
    wanted = AuditStatus(status) if status else None
    return audits.list_audits(db_session(), owner_id, status=wanted, limit=limit, offset=offset)


def events_of(owner_id: int, audit_id: str) -> list[AuditEvent]:
    return audits.list_events(db_session(), get_owned(owner_id, audit_id).id)


def artifacts_of(owner_id: int, audit_id: str) -> list[Artifact]:
    return audits.list_artifacts(db_session(), get_owned(owner_id, audit_id).id)


def artifact_of(owner_id: int, audit_id: str, name: str) -> Artifact:
    for artifact in artifacts_of(owner_id, audit_id):
        if artifact.name == name:
            return artifact
    raise not_found("artifact")


def report_of(owner_id: int, audit_id: str, fmt: str) -> Artifact:
    """The report file of an ended audit; ``report_not_ready`` while it is queued or running."""
    audit = get_owned(owner_id, audit_id)
    if not is_terminal(AuditStatus(audit.status)):
        raise AuditError(
            ErrorCode.REPORT_NOT_READY,
            f"The audit is {AuditStatus(audit.status).value}; the report is written when it ends.",
            {"status": AuditStatus(audit.status).value, "progress": audit.progress},
        )
    for artifact in audits.list_artifacts(db_session(), audit.id):
        if artifact.name == f"report.{fmt}":
            return artifact
    raise AuditError(ErrorCode.NOT_FOUND, "This audit ended without a report (it was cancelled before it started).")


def open_artifact(artifact: Artifact) -> Iterator[bytes]:
    return services().store.open_stream(artifact.key)


def presigned_url(artifact: Artifact) -> str | None:
    """A short-lived direct link when the store has them (S3), else None (stream it)."""
    return services().store.presigned_url(artifact.key)


# --- change -------------------------------------------------------------------------------


def cancel(owner_id: int, audit_id: str) -> Audit:
    """Queued: cancelled now. Running: flagged, the worker stops between batches.
    Already ended: ``conflict`` (409)."""
    session = db_session()
    audit = audits.request_cancel(session, get_owned(owner_id, audit_id).id)
    session.commit()
    return audit


def delete(owner_id: int, audit_id: str) -> None:
    """Delete an ended audit: its files under ``audits/{id}/`` first, then the row.

    Queued and running audits are refused with ``conflict``: a worker may be writing
    their files right now, and deleting under it would leave orphans. Cancel first
    (instant for a queued audit), then delete.
    """
    session = db_session()
    audit = get_owned(owner_id, audit_id)
    status = AuditStatus(audit.status)
    if not is_terminal(status):
        raise AuditError(
            ErrorCode.CONFLICT,
            f"The audit is {status.value}; cancel it before deleting it.",
            {"status": status.value},
        )
    services().store.delete_prefix(audit_prefix(audit.id))
    audits.delete_audit(session, audit.id)
    session.commit()
