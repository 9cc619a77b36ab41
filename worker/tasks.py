"""Celery tasks: thin wrappers that hand an audit id to the executor.

Each worker process keeps one engine, session factory and artifact store, created on
first use *after* the fork (``worker_process_init`` drops anything inherited: a
PostgreSQL connection shared by two processes corrupts both).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from auditor.store.artifacts import ArtifactStore, store_from_url
from auditor.store.db import make_engine, make_session_factory
from worker.celery_app import OPTIONS, REAP_TASK, RUN_AUDIT_TASK, RUNNER, SETTINGS, app
from worker.executor import execute_audit, reap_stale_audits
from worker.infra import TransientInfraError

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


@worker_ready.connect
def _reap_at_start(**_: Any) -> None:
    """A worker restarting after a crash should not wait a beat interval to clean up."""
    engine = make_engine(SETTINGS.database_url)
    try:
        reap_stale_audits(make_session_factory(engine), SETTINGS.heartbeat_timeout_s)
    except Exception:  # a sweep failing must not stop the worker from serving
        log.exception("reaping stale audits at start-up failed")
    finally:
        engine.dispose()


@app.task(
    name=RUN_AUDIT_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=OPTIONS.soft_time_limit_s,
    time_limit=OPTIONS.time_limit_s,
    autoretry_for=(TransientInfraError,),
    max_retries=OPTIONS.max_retries,
    retry_backoff=OPTIONS.retry_backoff_s,
    retry_backoff_max=OPTIONS.retry_backoff_max_s,
    retry_jitter=True,
)
def run_audit(self: Task, audit_id: str) -> None:
    """Run one audit; only ``TransientInfraError`` is retried, and the last try records it."""
    res = resources()
    final_attempt = self.request.retries >= (self.max_retries or 0)
    execute_audit(
        audit_id, SETTINGS, store=res.artifact_store, session_factory=res.sessions, final_attempt=final_attempt,
        runner=RUNNER,
    )


@app.task(name=REAP_TASK, ignore_result=True)
def reap_stale() -> list[str]:
    """Fail audits whose worker stopped heart-beating (``worker_lost``)."""
    return reap_stale_audits(resources().sessions, SETTINGS.heartbeat_timeout_s)
