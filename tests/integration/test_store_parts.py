"""The ``audit_parts`` rows of a split audit, on both engines: who may run a positive control, and when the
audit's main task takes it back (``auditor/store/parts.py``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from auditor.store import audits, parts
from auditor.store.models import Audit, AuditPart, User, utcnow

STALE = timedelta(seconds=30)


@pytest.fixture
def audit(db_session: Session) -> Audit:
    user = User(email="parts@example.com", password_hash="unused")
    db_session.add(user)
    db_session.flush()
    row, _ = audits.create_audit(db_session, owner_id=user.id, spec={"effort": "tiny"}, seed=0)
    audits.mark_running(db_session, row.id)
    return row


def status(session: Session, audit: Audit) -> dict[str, tuple[str, str | None]]:
    return {p.name: (p.status, p.worker) for p in parts.list_parts(session, audit.id)}


def test_a_queued_part_is_claimed_once_and_its_task_ends_it(db_session: Session, audit: Audit) -> None:
    assert parts.plan_parts(db_session, audit.id, ["badnets", "blended"], STALE) == {"badnets": "queued",
                                                                                     "blended": "queued"}
    attempt = parts.claim_part(db_session, audit.id, "badnets", "w-2", STALE)
    assert attempt == 1
    assert parts.claim_part(db_session, audit.id, "badnets", "w-3", STALE) is None  # a duplicate message
    assert not parts.take_part(db_session, audit.id, "badnets", "w-1", STALE)  # a live task holds it
    assert parts.beat_part(db_session, audit.id, "badnets", attempt) == ""
    assert parts.finish_part(db_session, audit.id, "badnets", attempt, parts.DONE, seconds=3.0)
    assert status(db_session, audit)["badnets"] == ("done", "w-2")
    # A restart of the audit keeps the finished part and re-queues the other.
    assert parts.plan_parts(db_session, audit.id, ["badnets", "blended"], STALE) == {"badnets": "done",
                                                                                     "blended": "queued"}


def test_the_main_task_takes_a_part_nobody_runs_and_its_late_task_stands_down(db_session: Session,
                                                                               audit: Audit) -> None:
    parts.plan_parts(db_session, audit.id, ["badnets"], STALE)
    assert parts.take_part(db_session, audit.id, "badnets", "w-1", STALE)  # still queued behind the audit
    assert status(db_session, audit)["badnets"] == ("taken", "w-1")
    assert parts.claim_part(db_session, audit.id, "badnets", "w-2", STALE) is None


def test_a_part_whose_worker_died_is_taken_or_claimed_again(db_session: Session, audit: Audit) -> None:
    parts.plan_parts(db_session, audit.id, ["badnets", "blended"], STALE)
    for name in ("badnets", "blended"):
        parts.claim_part(db_session, audit.id, name, "w-2", STALE)
    frozen = utcnow() - 2 * STALE
    for part in db_session.query(AuditPart).filter_by(audit_id=audit.id):
        part.heartbeat_at = frozen
    db_session.flush()
    assert parts.take_part(db_session, audit.id, "badnets", "w-1", STALE)
    assert parts.claim_part(db_session, audit.id, "blended", "w-3", STALE) == 2  # a redelivered message
    assert parts.beat_part(db_session, audit.id, "blended", 1) == "the part is no longer ours"  # the old attempt
    assert not parts.finish_part(db_session, audit.id, "blended", 1, parts.DONE)


def test_a_cancelled_audit_stops_its_parts_and_starts_none(db_session: Session, audit: Audit) -> None:
    parts.plan_parts(db_session, audit.id, ["badnets", "blended"], STALE)
    attempt = parts.claim_part(db_session, audit.id, "badnets", "w-2", STALE)
    audits.request_cancel(db_session, audit.id)
    assert parts.beat_part(db_session, audit.id, "badnets", attempt) == "the audit was cancelled"
    assert parts.claim_part(db_session, audit.id, "blended", "w-2", STALE) is None
