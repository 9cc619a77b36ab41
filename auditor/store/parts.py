"""The ``audit_parts`` rows of a split audit: who runs each positive control, and how it ended.

Every transition is one short transaction that locks the part's row, so of the main
task and any number of control tasks racing for a part exactly one wins:

* ``plan_parts`` (main task, per attempt): a part that is not done or held by a live
  worker goes (back) to ``queued``; the caller then sends its task.
* ``claim_part`` (control task): ``queued`` -- or ``running`` with a heartbeat frozen
  for ``stale_after`` (its worker died) -- becomes ``running`` on this worker.
* ``take_part`` (main task, when it needs a control nobody is running): the same two
  states become ``taken``; the main task then trains the control itself. This is what
  keeps a one-worker cluster from deadlocking on a part queued behind its own audit.
* ``finish_part`` (control task): ``running`` on this worker and attempt -> ``done``,
  ``failed`` or ``cancelled``; a part that was taken meanwhile stays taken.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.store.audits import get_audit
from auditor.store.lifecycle import AuditStatus, is_terminal
from auditor.store.models import AuditPart, utcnow

QUEUED, RUNNING, DONE, FAILED, CANCELLED, TAKEN = "queued", "running", "done", "failed", "cancelled", "taken"
#: Claims of one part per attempt of its audit: a part that killed its worker twice (out of memory, say) is not
#: handed to a third, the main task trains it instead (under the audit's own restart limit).
MAX_PART_ATTEMPTS = 2
ENDED = frozenset({DONE, FAILED, CANCELLED, TAKEN})


def list_parts(session: Session, audit_id: str) -> list[AuditPart]:
    return list(session.scalars(select(AuditPart).where(AuditPart.audit_id == audit_id).order_by(AuditPart.name)))


def _part(session: Session, audit_id: str, name: str) -> AuditPart | None:
    return session.scalars(
        select(AuditPart).where(AuditPart.audit_id == audit_id, AuditPart.name == name).with_for_update()
    ).first()


def _live(part: AuditPart, stale_after: timedelta) -> bool:
    return part.status == RUNNING and part.heartbeat_at is not None and utcnow() - part.heartbeat_at < stale_after


def plan_parts(session: Session, audit_id: str, names: list[str], stale_after: timedelta) -> dict[str, str]:
    """Queue every part that still needs a run; returns each part's status (``queued`` ones need a task sent)."""
    statuses = {}
    for name in names:
        part = _part(session, audit_id, name)
        if part is None:
            part = AuditPart(audit_id=audit_id, name=name, status=QUEUED, attempts=0)
            session.add(part)
        elif part.status != DONE and not _live(part, stale_after):
            part.status, part.worker, part.message, part.attempts = QUEUED, None, None, 0
        statuses[name] = part.status
    session.flush()
    return statuses


def claim_part(session: Session, audit_id: str, name: str, worker: str, stale_after: timedelta) -> int | None:
    """This worker's attempt number at the part, or None when it is not to run (done, live elsewhere, audit over)."""
    audit = get_audit(session, audit_id)
    if is_terminal(AuditStatus(audit.status)) or audit.cancel_requested:
        return None
    part = _part(session, audit_id, name)
    if part is None or not (part.status == QUEUED or (part.status == RUNNING and not _live(part, stale_after))):
        return None
    if part.attempts >= MAX_PART_ATTEMPTS:
        return None
    now = utcnow()
    part.status, part.worker, part.attempts = RUNNING, worker[:255], part.attempts + 1
    part.heartbeat_at = part.started_at = now
    part.finished_at, part.seconds, part.message = None, None, None
    return part.attempts


def take_part(session: Session, audit_id: str, name: str, worker: str, stale_after: timedelta) -> bool:
    """The main task takes a part nobody (alive) is running; False when a live task holds it or it is done."""
    part = _part(session, audit_id, name)
    if part is None:
        return True
    if part.status in (DONE, TAKEN) or _live(part, stale_after):
        return part.status == TAKEN
    part.status, part.worker, part.finished_at = TAKEN, worker[:255], utcnow()
    part.message = "trained by the audit's main task (no live control task held it when it was needed)"
    return True


def beat_part(session: Session, audit_id: str, name: str, attempt: int) -> str:
    """Refresh the heartbeat of our running part; returns why to stop ('' to go on)."""
    audit = get_audit(session, audit_id)
    if is_terminal(AuditStatus(audit.status)):
        return f"the audit is {AuditStatus(audit.status).value}"
    if audit.cancel_requested:
        return "the audit was cancelled"
    part = _part(session, audit_id, name)
    if part is None or part.status != RUNNING or part.attempts != attempt:
        return "the part is no longer ours"
    part.heartbeat_at = utcnow()
    return ""


def finish_part(session: Session, audit_id: str, name: str, attempt: int, status: str, *,
                seconds: float | None = None, message: str | None = None) -> bool:
    """Record how our attempt ended; False when the part moved on (taken, or a newer attempt)."""
    part = _part(session, audit_id, name)
    if part is None or part.status != RUNNING or part.attempts != attempt:
        return False
    part.status, part.finished_at, part.seconds, part.message = status, utcnow(), seconds, message
    return True


def part_view(part: AuditPart) -> dict[str, Any]:
    """A part as progress detail and tests show it."""
    return {"name": part.name, "status": part.status, "worker": part.worker, "attempts": part.attempts,
            "seconds": part.seconds}
