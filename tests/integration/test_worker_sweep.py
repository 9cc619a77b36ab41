"""The sweep every worker runs, on the real PostgreSQL, Redis and SeaweedFS, in-process.

It restarts audits whose worker died (once, then ``worker_lost``), re-publishes queued
audits whose message the broker lost -- and only those -- and delivers the webhooks
audits owe, retrying failures; a PostgreSQL advisory lock elects one sweeper at a time.
The sweep looks at the whole test database, so assertions are about this test's audits.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from e2e.processes import wait_for
from kombu import Connection
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker
from worker_support import (  # noqa: F401 (fixtures)
    broker_url,
    Owner,
    Receiver,
    load,
    new_owner,
    receiver,
    workers_database,
    workers_database_sessions,
    settings_for,
    submit,
)

from auditor import webhooks
from auditor.settings import Settings
from auditor.store import audits
from auditor.store.artifacts import S3Credentials, S3Store
from auditor.store.db import make_engine, session_scope
from auditor.store.lifecycle import WORKER_LOST, AuditStatus
from auditor.store.models import utcnow
from auditor.store.webhooks import get_outbox, list_deliveries
from web.jobs import CeleryQueue
from worker.broker import RedisBroker
from auditor.store.artifacts import checkpoint_prefix
from worker.notify import WebhookPolicy, deliver_webhook
from worker.sweep import Sweep, SweepLock

SPEC = {"effort": "tiny"}
RETRY_AT_ONCE = WebhookPolicy(max_attempts=3, backoff_s=(0.0,))


@pytest.fixture
def settings(tmp_path: Path, workers_database: str, s3_store: S3Store, s3_endpoint: str,
             s3_credentials: S3Credentials) -> Settings:
    """A database of the test's own: the sweep acts on every stranded audit, other files' too."""
    return settings_for(tmp_path, workers_database, s3_store, s3_endpoint, s3_credentials,
                        REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="30", REFINE_AUDIT_REPUBLISH_AFTER_S="60")


@pytest.fixture
def sweep(settings: Settings, sessions: sessionmaker[Session], s3_store: S3Store, broker_url: str) -> Iterator[Sweep]:
    broker = RedisBroker(broker_url)
    yield Sweep(settings, sessions, lambda: s3_store, publish=CeleryQueue(broker_url).enqueue, broker=broker,
                policy=RETRY_AT_ONCE)
    broker.close()


def running_and_silent(sessions: sessionmaker[Session], audit_id: str) -> None:
    with session_scope(sessions) as session:
        audits.mark_running(session, audit_id)
        audits.get_audit(session, audit_id).heartbeat_at = utcnow() - timedelta(minutes=10)


def published_long_ago(sessions: sessionmaker[Session], audit_id: str) -> None:
    with session_scope(sessions) as session:
        audits.get_audit(session, audit_id).published_at = utcnow() - timedelta(minutes=10)


def waiting_ids(broker_url: str) -> list[str]:
    broker = RedisBroker(broker_url)
    try:
        return sorted(broker.holdings(["cpu"]).waiting)
    finally:
        broker.close()


def verified(request: object, owner: Owner) -> bool:
    return webhooks.verify(request.body, owner.webhook_secret, request.headers[webhooks.TIMESTAMP_HEADER],
                           request.headers[webhooks.SIGNATURE_HEADER])


def test_sweep_restarts_lost_audits_and_republishes_only_messages_the_broker_lost(
    sweep: Sweep, sessions: sessionmaker[Session], s3_store: S3Store, broker_url: str
) -> None:
    owner = new_owner(sessions)
    lost, missing, waiting, fresh = (submit(sessions, s3_store, owner, SPEC, None) for _ in range(4))
    running_and_silent(sessions, lost)
    for audit_id in (missing, waiting):
        published_long_ago(sessions, audit_id)
    CeleryQueue(broker_url).enqueue(waiting, "cpu")  # still in the queue: merely waiting its turn

    report = sweep.run()

    assert report.recovered.get(lost) == AuditStatus.QUEUED
    assert {lost, missing} <= set(report.republished) and not {waiting, fresh} & set(report.republished)
    assert sorted(waiting_ids(broker_url)) == sorted([waiting, lost, missing])
    restarted = load(sessions, lost)
    assert (restarted.status, restarted.recoveries, restarted.attempts) == (AuditStatus.QUEUED, 1, 1)
    assert not {lost, missing, waiting, fresh} & set(sweep.run().republished)  # published now: no storm


def test_a_message_taken_by_a_worker_that_died_before_claiming_is_republished_after_the_grace(
    sweep: Sweep, sessions: sessionmaker[Session], s3_store: S3Store, broker_url: str
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), SPEC, None)
    CeleryQueue(broker_url).enqueue(audit_id, "cpu")
    published_long_ago(sessions, audit_id)
    with Connection(broker_url) as connection:  # a consumer takes the message and never acknowledges it
        taken = connection.SimpleQueue("cpu").get(timeout=10)
        holdings = sweep.broker.holdings(["cpu"])
        assert audit_id not in holdings.waiting and audit_id in holdings.taken_at  # kombu's unacked layout

        assert audit_id not in sweep.run().republished  # taken just now: its worker may be claiming the row
        redis = sweep.broker.client
        redis.zadd("unacked_index", {tag: 0 for tag in redis.zrange("unacked_index", 0, -1)})  # taken long ago
        assert audit_id in sweep.run().republished
        taken.ack()


def test_an_audit_whose_restart_also_dies_ends_worker_lost_and_says_so_once(
    sweep: Sweep, sessions: sessionmaker[Session], s3_store: S3Store, receiver: Receiver
) -> None:
    owner = new_owner(sessions)
    audit_id = submit(sessions, s3_store, owner, {**SPEC, "callback_url": receiver.url}, None)
    s3_store.put(checkpoint_prefix(audit_id) + "refine_checkpoint.pt", b"epoch 2")

    running_and_silent(sessions, audit_id)
    assert sweep.run().recovered[audit_id] == AuditStatus.QUEUED
    running_and_silent(sessions, audit_id)  # the restart's worker dies too
    assert sweep.run().recovered[audit_id] == AuditStatus.FAILED
    sweep.run()

    audit = load(sessions, audit_id)
    assert (audit.status, audit.error_code, audit.attempts) == (AuditStatus.FAILED, WORKER_LOST, 2)
    (request,) = receiver.requests
    assert request.json()["status"] == "failed" and request.json()["error"]["code"] == WORKER_LOST
    assert verified(request, owner)
    assert s3_store.list(checkpoint_prefix(audit_id)) == []


def test_a_webhook_the_receiver_refused_is_retried_by_the_sweep_and_delivered_once(
    sweep: Sweep, sessions: sessionmaker[Session], s3_store: S3Store, receiver: Receiver, settings: Settings
) -> None:
    receiver.statuses = [503, 200]
    owner = new_owner(sessions)
    audit_id = submit(sessions, s3_store, owner, {**SPEC, "callback_url": receiver.url}, None)
    with session_scope(sessions) as session:
        audits.mark_running(session, audit_id)
        audits.mark_succeeded(session, audit_id, {"verdict": "clean"})

    first = deliver_webhook(sessions, audit_id, settings.allowed_hosts, RETRY_AT_ONCE)  # the finisher's try
    sweep.run()
    sweep.run()

    assert first is not None and first.status_code == 503
    assert [r.json()["status"] for r in receiver.requests] == ["succeeded", "succeeded"]
    assert all(verified(r, owner) for r in receiver.requests)
    with session_scope(sessions) as session:
        assert [(d.attempt, d.status_code, d.succeeded) for d in list_deliveries(session, audit_id)] == [
            (1, 503, False), (2, 200, True)]
        assert get_outbox(session, audit_id).state == "delivered"


def test_an_audit_cancelled_while_queued_gets_its_webhook_from_the_sweep(
    sweep: Sweep, sessions: sessionmaker[Session], s3_store: S3Store, receiver: Receiver
) -> None:
    owner = new_owner(sessions)
    audit_id = submit(sessions, s3_store, owner, {**SPEC, "callback_url": receiver.url}, None)
    with session_scope(sessions) as session:  # what the web process does; it sends nothing itself
        audits.request_cancel(session, audit_id)

    sweep.run()

    (request,) = receiver.requests
    assert request.json()["status"] == "cancelled" and verified(request, owner)


def lock_engine(pg_url: str, name: str) -> Engine:
    return make_engine(pg_url, connect_args={"application_name": name})


def test_one_sweeper_holds_the_lock_and_another_takes_over_when_its_connection_dies(
    pg_url: str, pg_engine: Engine
) -> None:
    engines = [lock_engine(pg_url, f"sweep-lock-test-{n}") for n in (1, 2)]
    first, second = (SweepLock(engine) for engine in engines)
    try:
        assert first.held() and first.held()  # keeps it
        assert not second.held()

        holder = "FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'sweep-lock-test-1'"
        with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:  # an operator kills it
            admin.execute(text(f"SELECT pg_terminate_backend(pid) {holder}"))
            # pg_terminate_backend only signals; the lock goes when the backend has exited (each query
            # in its own transaction: pg_stat_activity is a snapshot per transaction)
            wait_for(lambda: admin.execute(text(f"SELECT count(*) {holder}")).scalar_one() == 0, 10,
                     message="the terminated backend to exit")
        assert second.held()
        assert not first.held()
        second.release()
        assert first.held()
    finally:
        for lock, engine in zip((first, second), engines):
            lock.release()
            engine.dispose()
