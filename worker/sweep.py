"""The periodic sweep that keeps the database's promises, whatever process died.

The database is the source of truth for work to do; the broker only carries
reminders. Every worker runs a ``Sweeper`` thread (started when it is ready, so no
separate scheduler process exists), and a PostgreSQL advisory lock elects one of them
at a time to run the ``Sweep``:

1. **Recover**: a running audit whose heartbeat stopped lost its worker. It is queued
   again (restarting from its last REFINE checkpoint) while it has restarts left
   (``REFINE_AUDIT_LOST_WORKER_RETRIES``), else failed with ``worker_lost``.
2. **Re-publish**: a queued audit whose message the broker no longer holds -- Redis
   restarted without it, or the worker that took it died before claiming the row --
   is published again. One that is merely waiting in a long queue is left alone.
3. **Webhooks**: every webhook owed and due is attempted (``worker.notify``).

Every step is safe to run twice or concurrently: rows are changed under row locks,
a duplicate message finds its audit claimed and is dropped (``worker.executor``), and
webhooks are leased. The lock only saves the work of doing it twice. The lock's
connection is a plain session: if the elected worker dies, PostgreSQL releases the
lock with the connection and another worker takes over at its next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import redis
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from auditor.settings import Settings
from auditor.store import audits as rows
from auditor.store.artifacts import ArtifactStore
from auditor.store.db import session_scope
from auditor.store.lifecycle import AuditStatus
from auditor.store.models import utcnow
from worker.broker import BrokerHoldings, RedisBroker
from worker.checkpoints import discard_checkpoints
from worker.infra import transient_error
from worker.notify import WebhookPolicy, deliver_due_webhooks

log = logging.getLogger(__name__)

#: The advisory lock key of the sweep (any constant shared by all workers of a database).
SWEEP_LOCK_KEY = 0x5245_4649_4E45  # "REFINE"
T = TypeVar("T")
Publish = Callable[[str, str], None]  # (audit_id, queue)


class SweepLock:
    """One sweeper per database at a time: a session-level PostgreSQL advisory lock.

    The lock lives as long as its connection, which this object keeps open between
    sweeps; if the connection dies (the process, the network, or an administrator
    terminating it), the lock is released and the next ``held()`` tries to win it back.
    SQLite serves a single machine, where there is nothing to elect.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._connection: Connection | None = None

    def held(self) -> bool:
        if self._engine.dialect.name != "postgresql":
            return True
        if self._connection is not None and self._alive(self._connection):
            return True
        self.release()
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            won = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": SWEEP_LOCK_KEY}))
        except SQLAlchemyError:
            connection.close()
            raise
        if won:
            self._connection = connection
            log.info("this worker now runs the sweep")
        else:
            connection.close()
        return won

    def release(self) -> None:
        """Unlock, then really close the lock's connection (never back to the pool, where it would stay locked).

        The explicit unlock hands the lock over at once: closing alone frees it only when the
        server's backend has exited, a moment later, and a sweeper asking in that moment loses
        a whole sweep interval. A dead connection cannot unlock; its backend's exit does it.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": SWEEP_LOCK_KEY})
        except SQLAlchemyError:
            pass
        try:
            connection.invalidate()
            connection.close()
        except SQLAlchemyError:
            pass

    @staticmethod
    def _alive(connection: Connection) -> bool:
        try:
            connection.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            log.warning("the sweep lock's database connection was lost; electing again")
            return False


@dataclass
class SweepReport:
    """What one pass did, for logs and tests."""

    recovered: dict[str, AuditStatus] = field(default_factory=dict)
    republished: list[str] = field(default_factory=list)
    webhooks_delivered: int = 0

    def __bool__(self) -> bool:
        return bool(self.recovered or self.republished or self.webhooks_delivered)


class Sweep:
    """One pass over the database (see the module docstring).

    Without ``publish`` (the embedded server, whose audits never leave its process)
    only webhooks are swept. ``broker`` is what the sweep asks before re-publishing;
    without it a queued audit is re-published only when its message is owed outright
    (a recovered audit), never on a guess.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: Callable[[], ArtifactStore],
        *,
        publish: Publish | None = None,
        broker: RedisBroker | None = None,
        policy: WebhookPolicy = WebhookPolicy(),
    ):
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.publish = publish
        self.broker = broker
        self.policy = policy

    def run(self) -> SweepReport:
        report = SweepReport()
        if self.publish is not None:
            report.recovered = self._step("recover lost audits", self.recover_lost, {})
            report.republished = self._step("re-publish queued audits", self.republish_missing, [])
        report.webhooks_delivered = self._step(
            "deliver webhooks", lambda: deliver_due_webhooks(self.sessions, self.settings.allowed_hosts, self.policy), 0
        )
        if report:
            log.info("sweep: %s", report)
        return report

    def recover_lost(self) -> dict[str, AuditStatus]:
        silence = timedelta(seconds=self.settings.heartbeat_timeout_s)
        with session_scope(self.sessions) as session:
            recovered = rows.reap_stale(session, silence, max_retries=self.settings.lost_worker_retries)
        for audit_id, status in recovered.items():
            log.warning("audit %s: no heartbeat for %s; now %s", audit_id, silence, status.value)
            if status != AuditStatus.QUEUED:
                self._step(f"discard checkpoints of {audit_id}", lambda a=audit_id: discard_checkpoints(self.store(), a), 0)
        return recovered

    def republish_missing(self) -> list[str]:
        if self.publish is None:
            return []
        grace = self.settings.republish_after_s
        with session_scope(self.sessions) as session:
            candidates = rows.unpublished_audits(session, utcnow() - timedelta(seconds=grace))
        if not candidates:
            return []
        holdings = self.broker.holdings({c.queue for c in candidates}) if self.broker is not None else None
        published = []
        for candidate in filter(lambda c: self._message_lost(c, holdings, time.time() - grace), candidates):
            self.publish(candidate.audit_id, candidate.queue)
            with session_scope(self.sessions) as session:
                rows.mark_published(session, candidate.audit_id)
            log.info("audit %s: published to queue %s", candidate.audit_id, candidate.queue)
            published.append(candidate.audit_id)
        return published

    @staticmethod
    def _message_lost(candidate: rows.Unpublished, holdings: BrokerHoldings | None, taken_since: float) -> bool:
        """Whether a queued audit needs a new message: owed outright, or gone from the broker.

        A message a worker took before ``taken_since`` without starting the audit counts as
        gone, unless the audit is owed a message outright -- then any taken copy is the dead
        worker's and only a waiting one counts.
        """
        if holdings is None:
            return candidate.overdue
        return not holdings.holds(candidate.audit_id, taken_since=None if candidate.overdue else taken_since)

    @staticmethod
    def _step(name: str, work: Callable[[], T], fallback: T) -> T:
        """A failing step (database or broker down) must not stop the others, nor the thread."""
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 -- logged; the next pass tries again
            if isinstance(exc, redis.RedisError) or transient_error(exc) is not None:
                log.warning("sweep step %r skipped, a service is unreachable: %s", name, exc)
            else:
                log.exception("sweep step %r failed", name)
            return fallback


class Sweeper:
    """A daemon thread running ``sweep`` every ``interval_s`` while ``lock`` is held.

    The first pass runs at once, so a worker restarting after a crash cleans up
    without waiting an interval.
    """

    def __init__(self, sweep: Sweep, lock: SweepLock, interval_s: float, on_stop: Callable[[], Any] = lambda: None):
        self.sweep = sweep
        self.lock = lock
        self.interval_s = interval_s
        self._on_stop = on_stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="refine-audit-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.lock.release()
        self._on_stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lock.held():
                    self.sweep.run()
            except Exception as exc:  # noqa: BLE001 -- the database is down: try again next interval
                log.warning("sweep skipped: %s", exc)
            self._stop.wait(self.interval_s)
