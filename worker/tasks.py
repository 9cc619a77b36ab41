"""Celery tasks and worker hooks: thin wrappers around the executor and the sweep.

Each worker process keeps one engine, session factory and artifact store, created on
first use *after* the fork (``worker_process_init`` drops anything inherited: a
PostgreSQL connection shared by two processes corrupts both). The main process of
every worker runs the sweep thread (``worker.sweep``), started once the worker is
ready and stopped at shutdown, so no separate scheduler process is needed.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from auditor.settings import Settings
from auditor.store.artifacts import ArtifactStore, store_from_url
from auditor.store.db import make_engine, make_session_factory
from worker.broker import RUN_AUDIT_TASK, RUN_CONTROL_TASK, RedisBroker
from worker.celery_app import DEFAULT_QUEUE, RUNNER, SETTINGS, app
from worker.executor import ExecutorOptions, download_inputs, execute_audit
from worker.parts import Dispatch, PartOptions, execute_control_part
from worker.infra import TransientInfraError
from worker.sweep import Sweep, Sweeper, SweepLock

log = logging.getLogger(__name__)


@dataclass
class _Resources:
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore | None = None

    def artifact_store(self) -> ArtifactStore:
        if self.store is None:
            self.store = store_from_url(SETTINGS.artifacts_url, SETTINGS)
        return self.store


_resources: _Resources | None = None
_lock = threading.Lock()
_sweeper: Sweeper | None = None


def resources() -> _Resources:
    """This process's engine, sessions and store (created lazily, once)."""
    global _resources
    with _lock:
        if _resources is None:
            engine = make_engine(SETTINGS.database_url)
            _resources = _Resources(engine, make_session_factory(engine))
        return _resources


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    """Forget the parent's pool without closing its sockets (they are the parent's)."""
    global _resources
    if _resources is not None:
        _resources.engine.dispose(close=False)
        _resources = None


@worker_process_shutdown.connect
def _dispose(**_: Any) -> None:
    if _resources is not None:
        _resources.engine.dispose()


def build_sweeper(settings: Settings, celery: Celery) -> Sweeper:
    """The sweep of a Celery worker: publishes through ``celery``, reads the broker, elects by lock."""
    engine = make_engine(settings.database_url)
    own = _Resources(engine, make_session_factory(engine))  # the main process's, apart from the pool's

    def publish(audit_id: str, queue: str) -> None:
        with celery.connection_for_write() as connection:  # the sweep's own connection: not shared across threads
            celery.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=queue, connection=connection)

    broker = RedisBroker(settings.broker_url) if (settings.broker_url or "").startswith("redis") else None
    sweep = Sweep(settings, own.sessions, own.artifact_store, publish=publish, broker=broker)
    return Sweeper(sweep, SweepLock(engine), settings.sweep_interval_s, on_stop=engine.dispose)


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    _sweeper = build_sweeper(SETTINGS, app).start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()


#: Both long tasks: acknowledged only when done, handed back if their pool process dies, and time-limited.
_LONG_TASK: dict[str, Any] = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True,
    "soft_time_limit": SETTINGS.audit_time_limit_s, "time_limit": SETTINGS.hard_time_limit_s,
}


@app.task(
    name=RUN_AUDIT_TASK,
    **_LONG_TASK,
    autoretry_for=(TransientInfraError,),
    max_retries=SETTINGS.task_max_retries,
    retry_backoff=SETTINGS.task_retry_backoff_s,
    retry_backoff_max=SETTINGS.task_retry_backoff_max_s,
    retry_jitter=True,
)
def run_audit(self: Task, audit_id: str) -> None:
    """Run one audit; only ``TransientInfraError`` is retried, and the last try records it."""
    res = resources()
    final_attempt = self.request.retries >= (self.max_retries or 0)
    execute_audit(
        audit_id, SETTINGS, store=res.artifact_store, session_factory=res.sessions, final_attempt=final_attempt,
        runner=RUNNER, dispatch=_dispatch(self),
    )


def _worker_name(task: Task) -> str:
    return task.request.hostname or socket.gethostname()


def _dispatch(task: Task) -> Dispatch:
    """Control tasks go to the queue the audit came from (a GPU audit's controls want GPU workers too)."""
    queue = (task.request.delivery_info or {}).get("routing_key") or DEFAULT_QUEUE

    def send(audit_id: str, name: str) -> None:
        app.send_task(RUN_CONTROL_TASK, args=[audit_id, name], queue=queue)

    return Dispatch(send, _worker_name(task))


@app.task(name=RUN_CONTROL_TASK, **_LONG_TASK)
def run_control(self: Task, audit_id: str, name: str) -> None:
    """One positive control of a split audit (``worker/parts.py``). Never retried by Celery: a part that fails or
    whose worker dies is trained by the audit's main task when it needs it, so no retry policy can lose it."""
    res = resources()
    defaults = ExecutorOptions()
    options = PartOptions(
        keepalive_s=defaults.keepalive_s(SETTINGS.heartbeat_timeout_s),
        stale_after=timedelta(seconds=defaults.abandoned_after_s(SETTINGS.heartbeat_timeout_s)),
    )
    execute_control_part(audit_id, name, SETTINGS, store=res.artifact_store, sessions=res.sessions, runner=RUNNER,
                         worker=_worker_name(self), download=download_inputs, options=options)
