"""Audit rows on both engines: idempotent submission, the status machine, the reaper,
owner isolation, paging, cancellation and artifact records."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.errors import ErrorCode
from auditor.store import audits
from auditor.store.artifacts import ObjectInfo
from auditor.store.lifecycle import WORKER_LOST, AuditStatus, IllegalTransition, transition
from auditor.store.models import Audit, AuditEvent, User, utcnow

SPEC = {"model": {"kind": "checkpoint"}, "dataset": "fashion-mnist"}


@pytest.fixture
def session(db_session: Session) -> Session:
    return db_session


def add_user(session: Session, email: str) -> User:
    user = User(email=email, password_hash="unused")
    session.add(user)
    session.flush()
    return user


@pytest.fixture
def owner(session: Session) -> User:
    return add_user(session, "owner@example.com")


def new_audit(session: Session, owner: User) -> Audit:
    audit, created = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=7)
    assert created
    return audit


def test_same_idempotency_key_returns_the_existing_audit(session: Session, owner: User) -> None:
    first, created = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=1, idempotency_key="k-1")
    again, created_again = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=2, idempotency_key="k-1")
    assert created and not created_again
    assert again.id == first.id and again.seed == 1


def test_losing_an_idempotency_race_returns_the_winner(
    session: Session, owner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner, _ = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=1, idempotency_key="race")
    real_find = audits._find_by_idempotency_key
    lookups = iter([None])  # the first lookup misses, as if the winner had not committed yet
    monkeypatch.setattr(audits, "_find_by_idempotency_key", lambda *a: next(lookups, None) or real_find(*a))

    loser, created = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=2, idempotency_key="race")

    assert not created and loser.id == winner.id
    assert audits.list_audits(session, owner.id).total == 1


def test_idempotency_keys_are_scoped_per_owner(session: Session, owner: User) -> None:
    other = add_user(session, "other@example.com")
    mine, _ = audits.create_audit(session, owner_id=owner.id, spec=SPEC, seed=1, idempotency_key="k")
    theirs, created = audits.create_audit(session, owner_id=other.id, spec=SPEC, seed=1, idempotency_key="k")
    assert created and theirs.id != mine.id


def test_audit_runs_to_success_with_progress_and_a_stage_log(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    audits.update_progress(session, audit.id, "refine", 0.5, {"epoch": 3, "epochs": 6})
    done = audits.mark_succeeded(session, audit.id, {"asr_after": 0.01})
    session.commit()
    assert (done.status, done.progress, done.summary) == (AuditStatus.SUCCEEDED, 1.0, {"asr_after": 0.01})
    assert done.started_at is not None and done.finished_at is not None and done.attempts == 1
    assert done.stage_detail == {"epoch": 3, "epochs": 6}
    kinds = [(e.kind, e.stage) for e in audits.list_events(session, audit.id)]
    assert kinds == [("status", None), ("status", None), ("stage", "refine"), ("status", "refine")]


def test_illegal_transitions_are_refused_and_leave_the_status(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    audits.mark_succeeded(session, audit.id, {})
    for move in (audits.mark_running, audits.mark_cancelled):
        with pytest.raises(IllegalTransition):
            move(session, audit.id)
    with pytest.raises(IllegalTransition):
        audits.mark_failed(session, audit.id, ErrorCode.INTERNAL_ERROR, "late failure")
    with pytest.raises(IllegalTransition):
        audits.update_progress(session, audit.id, "evaluate", 0.9)
    assert audits.get_audit(session, audit.id).status == AuditStatus.SUCCEEDED


def test_queued_audit_cannot_succeed_without_running() -> None:
    class Row:
        status = AuditStatus.QUEUED

    with pytest.raises(IllegalTransition) as raised:
        transition(Row(), AuditStatus.SUCCEEDED)
    assert raised.value.detail == {"status": "queued", "requested": "succeeded"}


def test_only_a_queued_audit_can_be_claimed(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    with pytest.raises(IllegalTransition):
        audits.mark_running(session, audit.id)  # a second message for the same audit
    assert audits.get_audit(session, audit.id).attempts == 1


def test_a_transient_failure_hands_the_row_back_to_queued_for_the_retry(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)

    assert audits.requeue_for_retry(session, audit.id, 2, "S3 down") is None  # not this attempt's row
    requeued = audits.requeue_for_retry(session, audit.id, 1, "S3 down")
    again = audits.mark_running(session, audit.id)

    assert requeued is not None and again.attempts == 2 and again.recoveries == 0
    moves = [e.data["to"] for e in audits.list_events(session, audit.id) if e.kind == "status" and e.data]
    assert moves == ["queued", "running", "queued", "running"]


def test_failure_records_code_and_message(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    failed = audits.mark_failed(session, audit.id, ErrorCode.INVALID_CHECKPOINT, "Not a TorchScript archive.")
    assert (failed.status, failed.error_code, failed.error_message) == (
        AuditStatus.FAILED, "invalid_checkpoint", "Not a TorchScript archive.",
    )


def silence(session: Session, audit: Audit) -> None:
    audits.get_audit(session, audit.id).heartbeat_at = utcnow() - timedelta(minutes=10)
    session.flush()


def test_reaper_restarts_a_silent_audit_once_then_fails_it_with_worker_lost(session: Session, owner: User) -> None:
    stale, alive, queued = new_audit(session, owner), new_audit(session, owner), new_audit(session, owner)
    for audit in (stale, alive):
        audits.mark_running(session, audit.id)
    silence(session, stale)

    first = audits.reap_stale(session, timedelta(minutes=5), max_retries=1)
    restarted = audits.get_audit(session, stale.id)
    assert first == {stale.id: AuditStatus.QUEUED}
    assert (restarted.recoveries, restarted.published_at) == (1, None)  # None: the sweep publishes it at once
    assert audits.get_audit(session, alive.id).status == AuditStatus.RUNNING
    assert audits.get_audit(session, queued.id).status == AuditStatus.QUEUED

    audits.mark_running(session, stale.id)
    silence(session, stale)
    second = audits.reap_stale(session, timedelta(minutes=5), max_retries=1)

    lost = audits.get_audit(session, stale.id)
    assert second == {stale.id: AuditStatus.FAILED}
    assert (lost.status, lost.error_code, lost.attempts) == (AuditStatus.FAILED, WORKER_LOST, 2)
    assert "after 1 restart" in lost.error_message


def test_a_silent_audit_with_a_cancel_request_is_cancelled_not_restarted(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    audits.request_cancel(session, audit.id)
    silence(session, audit)

    assert audits.reap_stale(session, timedelta(minutes=5), max_retries=1) == {audit.id: AuditStatus.CANCELLED}


def test_unpublished_audits_are_the_queued_ones_never_or_long_ago_published(session: Session, owner: User) -> None:
    fresh, old, owed, running = (new_audit(session, owner) for _ in range(4))
    audits.get_audit(session, old.id).published_at = utcnow() - timedelta(minutes=10)
    audits.get_audit(session, owed.id).published_at = None
    audits.mark_running(session, running.id)
    audits.get_audit(session, running.id).published_at = None
    session.flush()

    found = audits.unpublished_audits(session, utcnow() - timedelta(minutes=5))
    assert {(u.audit_id, u.overdue) for u in found} == {(old.id, False), (owed.id, True)}

    assert audits.mark_published(session, owed.id) and not audits.mark_published(session, running.id)
    assert {u.audit_id for u in audits.unpublished_audits(session, utcnow() - timedelta(minutes=5))} == {old.id}


def test_cancel_of_a_queued_audit_is_immediate(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    cancelled = audits.request_cancel(session, audit.id)
    assert cancelled.status == AuditStatus.CANCELLED and cancelled.finished_at is not None
    assert audits.request_cancel(session, audit.id).status == AuditStatus.CANCELLED


def test_cancel_of_a_running_audit_sets_the_flag_the_worker_sees(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    assert audits.heartbeat(session, audit.id) is False
    audits.request_cancel(session, audit.id)
    assert audits.heartbeat(session, audit.id) is True
    assert audits.mark_cancelled(session, audit.id).status == AuditStatus.CANCELLED


def test_cancel_of_a_finished_audit_is_refused(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    audits.mark_running(session, audit.id)
    audits.mark_succeeded(session, audit.id, {})
    with pytest.raises(IllegalTransition):
        audits.request_cancel(session, audit.id)


def test_other_owners_cannot_see_an_audit(session: Session, owner: User) -> None:
    intruder = add_user(session, "intruder@example.com")
    audit = new_audit(session, owner)
    assert audits.get_audit_for_owner(session, audit.id, owner.id) is audit
    assert audits.get_audit_for_owner(session, audit.id, intruder.id) is None
    assert audits.list_audits(session, intruder.id).total == 0


def test_list_audits_pages_newest_first_and_filters_by_status(session: Session, owner: User) -> None:
    created = [new_audit(session, owner) for _ in range(5)]
    for index, audit in enumerate(created):
        audit.created_at = utcnow() + timedelta(seconds=index)
    audits.request_cancel(session, created[0].id)
    session.flush()

    first = audits.list_audits(session, owner.id, limit=2)
    second = audits.list_audits(session, owner.id, limit=2, offset=2)
    cancelled = audits.list_audits(session, owner.id, status=AuditStatus.CANCELLED)

    assert first.total == 5 and [a.id for a in first.items] == [created[4].id, created[3].id]
    assert [a.id for a in second.items] == [created[2].id, created[1].id]
    assert cancelled.total == 1 and cancelled.items[0].id == created[0].id


def test_artifact_records_are_replaced_by_name(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    for size in (10, 20):
        info = ObjectInfo(key=f"audits/{audit.id}/report.json", size=size, sha256="0" * 64)
        audits.add_artifact(
            session, audit.id, name="report.json", info=info, kind="report", content_type="application/json"
        )
    (only,) = audits.list_artifacts(session, audit.id)
    assert only.size == 20


def test_delete_removes_the_audit_with_its_events_and_artifacts(session: Session, owner: User) -> None:
    audit = new_audit(session, owner)
    info = ObjectInfo(key=f"audits/{audit.id}/log.txt", size=1, sha256="0" * 64)
    audits.add_artifact(session, audit.id, name="log.txt", info=info, kind="log", content_type="text/plain")
    audits.delete_audit(session, audit.id)
    session.expunge_all()
    with pytest.raises(audits.AuditNotFound):
        audits.get_audit(session, audit.id)
    assert session.scalars(select(AuditEvent).where(AuditEvent.audit_id == audit.id)).all() == []
    assert audits.list_artifacts(session, audit.id) == []
