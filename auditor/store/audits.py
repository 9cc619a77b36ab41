"""Audit rows: the calls the web app, the worker and the reaper make.

The row is the truth for status and progress. Every status change goes through
``lifecycle.transition`` and leaves an ``audit_events`` entry, so the stage log doubles
as an audit trail. Functions flush but never commit: the caller owns the unit of work
(``db.session_scope``), which keeps "commit the row, then enqueue" in the caller's hands.
Rows are loaded ``FOR UPDATE`` (a no-op on SQLite) so the reaper and a worker cannot
both finish the same audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.errors import ErrorCode
from auditor.store.artifacts import ObjectInfo
from auditor.store.lifecycle import WORKER_LOST, AuditStatus, IllegalTransition, transition
from auditor.store.models import Artifact, Audit, AuditEvent, utcnow

MAX_PAGE_SIZE = 100


class AuditNotFound(LookupError):
    """No audit with this id (it never existed or was deleted)."""

    def __init__(self, audit_id: str):
        super().__init__(f"No audit {audit_id!r}.")
        self.audit_id = audit_id


@dataclass(frozen=True)
class Page:
    items: list[Audit]
    total: int
    limit: int
    offset: int


# --- creation and reads (web) -------------------------------------------------------


def create_audit(
    session: Session,
    *,
    owner_id: int,
    spec: dict[str, Any],
    seed: int,
    queue: str = "cpu",
    idempotency_key: str | None = None,
    software: dict[str, Any] | None = None,
) -> tuple[Audit, bool]:
    """Insert a queued audit; returns ``(audit, created)``.

    With an idempotency key already used by this owner, the existing audit is returned
    with ``created=False`` (and must not be enqueued again). A concurrent request with
    the same key loses the unique-constraint race inside a savepoint and gets the winner.
    """
    if idempotency_key is not None:
        existing = _find_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is not None:
            return existing, False
    audit = Audit(
        owner_id=owner_id,
        spec=spec,
        seed=seed,
        queue=queue,
        idempotency_key=idempotency_key,
        software=software or {},
        status=AuditStatus.QUEUED,
    )
    try:
        with session.begin_nested():
            session.add(audit)
    except IntegrityError:
        if idempotency_key is None:
            raise
        winner = _find_by_idempotency_key(session, owner_id, idempotency_key)
        if winner is None:
            raise
        return winner, False
    record_event(session, audit.id, "status", "Audit queued.", data={"from": None, "to": AuditStatus.QUEUED.value})
    return audit, True


def _find_by_idempotency_key(session: Session, owner_id: int, key: str) -> Audit | None:
    query = select(Audit).where(Audit.owner_id == owner_id, Audit.idempotency_key == key)
    return session.scalars(query).one_or_none()


def get_audit(session: Session, audit_id: str, *, for_update: bool = False) -> Audit:
    """The audit or ``AuditNotFound``; for workers and the reaper, which act on any owner's row."""
    query = select(Audit).where(Audit.id == audit_id)
    if for_update:
        query = query.with_for_update()
    audit = session.scalars(query).one_or_none()
    if audit is None:
        raise AuditNotFound(audit_id)
    return audit


def get_audit_for_owner(session: Session, audit_id: str, owner_id: int) -> Audit | None:
    """None when missing *or* someone else's, so the API answers 404 either way."""
    query = select(Audit).where(Audit.id == audit_id, Audit.owner_id == owner_id)
    return session.scalars(query).one_or_none()


def list_audits(
    session: Session,
    owner_id: int,
    *,
    status: AuditStatus | None = None,
    limit: int = 20,
    offset: int = 0,
) -> Page:
    """The owner's audits, newest first, one page plus the total for the pager."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    offset = max(0, offset)
    where = [Audit.owner_id == owner_id]
    if status is not None:
        where.append(Audit.status == status)
    total = session.scalar(select(func.count()).select_from(Audit).where(*where)) or 0
    query = select(Audit).where(*where).order_by(Audit.created_at.desc(), Audit.id).limit(limit).offset(offset)
    return Page(items=list(session.scalars(query)), total=total, limit=limit, offset=offset)


def list_events(session: Session, audit_id: str) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).where(AuditEvent.audit_id == audit_id).order_by(AuditEvent.id)))


def request_cancel(session: Session, audit_id: str) -> Audit:
    """A queued audit is cancelled at once; a running one gets the flag its trainer polls.

    Cancelling an already cancelled audit is a no-op; a finished one raises
    ``IllegalTransition``.
    """
    audit = get_audit(session, audit_id, for_update=True)
    if audit.status == AuditStatus.CANCELLED:
        return audit
    if audit.status == AuditStatus.RUNNING:
        audit.cancel_requested = True
        record_event(session, audit.id, "cancel_requested", "Cancellation requested.")
        return audit
    audit.cancel_requested = True
    return _finish(session, audit, AuditStatus.CANCELLED, "Audit cancelled before it started.")


def delete_audit(session: Session, audit_id: str) -> None:
    """Delete the row with its events, artifact records and deliveries (database cascade).

    The artifact files under ``audits/{id}/`` are the caller's to delete from the store.
    """
    session.delete(get_audit(session, audit_id))
    session.flush()


# --- progress (worker) ----------------------------------------------------------------


def mark_running(session: Session, audit_id: str) -> Audit:
    """Start (or, after a redelivery, restart) an attempt: ``queued -> running``.

    A row still ``running`` means the broker redelivered the task because the previous
    worker died; it is requeued first so the restart goes through the table and the log.
    """
    audit = get_audit(session, audit_id, for_update=True)
    if audit.status == AuditStatus.RUNNING:
        _set_status(session, audit, AuditStatus.QUEUED, "Task redelivered; restarting the audit.")
    now = utcnow()
    _set_status(session, audit, AuditStatus.RUNNING, "Audit started.")
    audit.started_at = audit.started_at or now
    audit.heartbeat_at = now
    audit.attempts += 1
    return audit


def heartbeat(session: Session, audit_id: str) -> bool:
    """Prove the worker is alive; returns whether a cancel was requested (one round trip).

    Raises ``IllegalTransition`` once the audit is no longer running (reaped, cancelled),
    which tells a worker that lost its audit to stop.
    """
    audit = _running(session, audit_id)
    audit.heartbeat_at = utcnow()
    return audit.cancel_requested


def update_progress(
    session: Session, audit_id: str, stage: str, progress: float, detail: dict[str, Any] | None = None
) -> Audit:
    """Store the stage, overall progress in [0, 1] and stage detail; also a heartbeat."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be within [0, 1], not {progress}")
    audit = _running(session, audit_id)
    if stage != audit.stage:
        record_event(session, audit.id, "stage", f"Stage {stage} started.", stage=stage)
    audit.stage = stage
    audit.progress = progress
    audit.stage_detail = detail or {}
    audit.heartbeat_at = utcnow()
    return audit


def record_event(
    session: Session,
    audit_id: str,
    kind: str,
    message: str,
    *,
    stage: str | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(audit_id=audit_id, kind=kind, stage=stage, message=message, data=data)
    session.add(event)
    session.flush()
    return event


def mark_succeeded(session: Session, audit_id: str, summary: dict[str, Any]) -> Audit:
    audit = get_audit(session, audit_id, for_update=True)
    audit.summary = summary
    audit.progress = 1.0
    return _finish(session, audit, AuditStatus.SUCCEEDED, "Audit succeeded.")


def mark_failed(session: Session, audit_id: str, code: ErrorCode | str, message: str) -> Audit:
    """Record a readable failure; the caller re-raises the exception afterwards."""
    audit = get_audit(session, audit_id, for_update=True)
    return _fail(session, audit, code, message)


def mark_cancelled(session: Session, audit_id: str, message: str = "Audit cancelled.") -> Audit:
    audit = get_audit(session, audit_id, for_update=True)
    return _finish(session, audit, AuditStatus.CANCELLED, message)


def reap_stale(session: Session, heartbeat_timeout: timedelta, *, now: datetime | None = None) -> list[str]:
    """Fail running audits whose worker has been silent longer than the timeout.

    Called periodically (Celery beat); returns the ids it failed with ``worker_lost``.
    ``SKIP LOCKED`` leaves rows a live worker is writing right now to the next sweep.
    """
    cutoff = (now or utcnow()) - heartbeat_timeout
    stale = or_(Audit.heartbeat_at < cutoff, Audit.heartbeat_at.is_(None) & (Audit.updated_at < cutoff))
    query = select(Audit).where(Audit.status == AuditStatus.RUNNING, stale).with_for_update(skip_locked=True)
    reaped = []
    for audit in session.scalars(query):
        _fail(session, audit, WORKER_LOST, f"The worker stopped responding for more than {heartbeat_timeout}.")
        reaped.append(audit.id)
    return reaped


# --- artifacts ------------------------------------------------------------------------


def add_artifact(
    session: Session, audit_id: str, *, name: str, info: ObjectInfo, kind: str, content_type: str
) -> Artifact:
    """Record a stored file; the same name again (a re-run) replaces the record."""
    artifact = session.scalars(
        select(Artifact).where(Artifact.audit_id == audit_id, Artifact.name == name)
    ).one_or_none() or Artifact(audit_id=audit_id, name=name)
    artifact.key = info.key
    artifact.size = info.size
    artifact.sha256 = info.sha256
    artifact.kind = kind
    artifact.content_type = content_type
    session.add(artifact)
    session.flush()
    return artifact


def list_artifacts(session: Session, audit_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.audit_id == audit_id).order_by(Artifact.name)))


# --- helpers --------------------------------------------------------------------------


def _running(session: Session, audit_id: str) -> Audit:
    """Progress writes are only valid while running; a reaped or cancelled audit refuses them."""
    audit = get_audit(session, audit_id)
    if audit.status != AuditStatus.RUNNING:
        raise IllegalTransition(audit.status, AuditStatus.RUNNING)
    return audit


def _fail(session: Session, audit: Audit, code: ErrorCode | str, message: str) -> Audit:
    audit.error_code = code.value if isinstance(code, ErrorCode) else code
    audit.error_message = message
    return _finish(session, audit, AuditStatus.FAILED, message)


def _finish(session: Session, audit: Audit, status: AuditStatus, message: str) -> Audit:
    _set_status(session, audit, status, message)
    audit.finished_at = utcnow()
    return audit


def _set_status(session: Session, audit: Audit, status: AuditStatus, message: str) -> None:
    previous = audit.status
    transition(audit, status)
    data = {"from": AuditStatus(previous).value, "to": status.value}
    record_event(session, audit.id, "status", message, stage=audit.stage, data=data)
