"""Audit rows: the calls the web app, the worker and the reaper make.

The row is the truth for status and progress. Every status change goes through
``lifecycle.transition`` and leaves an ``audit_events`` entry, so the stage log doubles
as an audit trail. Functions flush but never commit: the caller owns the unit of work
(``db.session_scope``), which keeps "commit the row, then enqueue" in the caller's hands.
Rows are loaded ``FOR UPDATE`` (a no-op on SQLite) so the sweep and a worker cannot
both finish the same audit. The transaction that ends an audit also records the
webhook it owes (``webhooks.owe_webhook``), so no terminal state goes unannounced.

Running an audit is a claim on a ``queued`` row (``mark_running``); an audit whose
worker died goes back to ``queued`` through ``recover_lost`` -- at most
``max_retries`` times -- and is otherwise failed with ``worker_lost``.
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
from auditor.store.webhooks import owe_webhook

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
    token_id: int | None = None,
) -> tuple[Audit, bool]:
    """Insert a queued audit; returns ``(audit, created)``.

    ``token_id`` is the API token that submitted it (its secret signs the webhook);
    ``published_at`` starts now because the caller publishes the message right after
    committing -- the sweep publishes it again only if it then goes missing.

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
        token_id=token_id,
        published_at=utcnow(),
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
    """Claim a queued audit for one attempt: ``queued -> running``, ``attempts + 1``.

    Only a queued row can be claimed (``IllegalTransition`` otherwise), so of two
    messages for the same audit only the first runs it.
    """
    audit = get_audit(session, audit_id, for_update=True)
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


def requeue_for_retry(session: Session, audit_id: str, attempt: int, reason: str) -> Audit | None:
    """``running -> queued`` after a transient failure, when the task will retry.

    The task's own retry message is the publication, hence ``published_at = now``.
    None when the row is no longer this attempt's (reaped, cancelled, or restarted).
    """
    audit = get_audit(session, audit_id, for_update=True)
    if audit.status != AuditStatus.RUNNING or audit.attempts != attempt:
        return None
    _set_status(session, audit, AuditStatus.QUEUED, f"Retrying after a transient failure: {reason}")
    audit.published_at = utcnow()
    return audit


def recover_lost(session: Session, audit: Audit, max_retries: int, silence: timedelta) -> AuditStatus:
    """Decide the fate of a running audit whose worker stopped heart-beating.

    A requested cancel wins; otherwise the audit is queued again (``published_at =
    None``: the sweep publishes it) while it has restarts left, and failed with
    ``worker_lost`` once they are spent. Returns the new status.
    """
    if audit.cancel_requested:
        _finish(session, audit, AuditStatus.CANCELLED, "Audit cancelled; its worker stopped before it could stop itself.")
    elif audit.recoveries < max_retries:
        audit.recoveries += 1
        message = (f"The worker stopped responding for more than {silence}; restarting from the last checkpoint "
                   f"(restart {audit.recoveries} of {max_retries}).")
        _set_status(session, audit, AuditStatus.QUEUED, message)
        audit.published_at = None
    else:
        restarts = f" after {audit.recoveries} restart{'s' if audit.recoveries != 1 else ''}" if audit.recoveries else ""
        _fail(session, audit, WORKER_LOST, f"The worker stopped responding for more than {silence}{restarts}.")
    return AuditStatus(audit.status)


def reap_stale(
    session: Session, heartbeat_timeout: timedelta, *, max_retries: int, now: datetime | None = None
) -> dict[str, AuditStatus]:
    """Recover every running audit whose worker has been silent longer than the timeout.

    Returns ``{audit_id: new status}`` (``queued`` to publish again, ``failed`` with
    ``worker_lost``, or ``cancelled``). ``SKIP LOCKED`` leaves rows a live worker is
    writing right now to the next sweep.
    """
    cutoff = (now or utcnow()) - heartbeat_timeout
    stale = or_(Audit.heartbeat_at < cutoff, Audit.heartbeat_at.is_(None) & (Audit.updated_at < cutoff))
    query = select(Audit).where(Audit.status == AuditStatus.RUNNING, stale).with_for_update(skip_locked=True)
    return {audit.id: recover_lost(session, audit, max_retries, heartbeat_timeout) for audit in session.scalars(query)}


@dataclass(frozen=True)
class Unpublished:
    """A queued audit the sweep may have to publish; ``overdue``: its message is owed now."""

    audit_id: str
    queue: str
    overdue: bool


def unpublished_audits(session: Session, published_before: datetime, *, limit: int = 500) -> list[Unpublished]:
    """Queued audits never published (``published_at`` NULL) or published before the cutoff, oldest first."""
    stale = or_(Audit.published_at.is_(None), Audit.published_at < published_before)
    query = (
        select(Audit.id, Audit.queue, Audit.published_at)
        .where(Audit.status == AuditStatus.QUEUED, stale)
        .order_by(Audit.created_at)
        .limit(limit)
    )
    return [Unpublished(audit_id, queue, published is None) for audit_id, queue, published in session.execute(query)]


def mark_published(session: Session, audit_id: str, *, now: datetime | None = None) -> bool:
    """Record a publication; False when the audit left ``queued`` meanwhile (nothing to record)."""
    audit = session.get(Audit, audit_id, with_for_update=True)
    if audit is None or audit.status != AuditStatus.QUEUED:
        return False
    audit.published_at = now or utcnow()
    return True


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
    """Every terminal status goes through here, and so owes its webhook in the same transaction."""
    _set_status(session, audit, status, message)
    audit.finished_at = utcnow()
    owe_webhook(session, audit)
    return audit


def _set_status(session: Session, audit: Audit, status: AuditStatus, message: str) -> None:
    previous = audit.status
    transition(audit, status)
    data = {"from": AuditStatus(previous).value, "to": status.value}
    record_event(session, audit.id, "status", message, stage=audit.stage, data=data)
