"""A real Celery worker process on the real PostgreSQL, Redis and SeaweedFS.

Audits are sent the way the web app sends them (``web.jobs.CeleryQueue``: by task name,
after the row is committed). The worker runs as a deployment runs it -- prefork pool,
late acks, no scheduler process. Whole workers killed mid-audit, Redis restarts and
the other faults are in ``test_worker_faults.py``; here the pool process running an
audit dies alone, and an audit overruns its time limit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from e2e.processes import ServiceProcess, deployment_env, start_celery_worker, wait_for
from sqlalchemy.orm import Session, sessionmaker
from worker_support import (  # noqa: F401 (fixtures)
    MINI_SPEC, broker_url, load, new_owner, submit, tiny_checkpoint, workers_database, workers_database_sessions,
)

from auditor.store.artifacts import S3Credentials, S3Store, artifact_key
from auditor.store.lifecycle import AuditStatus, is_terminal
from web.jobs import CeleryQueue

STARTUP_S = 120  # importing torch on two busy shared cores is slow
AUDIT_S = 420
#: For the kill tests: REFINE long enough that the kill always lands inside it, however busy the machine. With the
#: mini audit's one epoch, the audit could finish between seeing it train and the kill. 40 epochs of two steps last
#: ~15 s on a quiet 2-core machine against ~1 s from the stage's start to the kill; the restarted attempt then runs
#: them all, since the kill lands before the first epoch's checkpoint (200 cost the suite an extra minute).
KILL_SPEC = {**MINI_SPEC, "refine": {"epochs": 40}}


@pytest.fixture
def worker_env(
    tmp_path: Path, workers_database: str, broker_url: str, s3_store: S3Store, s3_endpoint: str,
    s3_credentials: S3Credentials,
) -> dict[str, str]:
    """What a worker of this deployment sees; tests override the timing variables."""
    return deployment_env(
        database_url=workers_database, broker_url=broker_url, bucket=s3_store.bucket, s3_endpoint=s3_endpoint,
        access_key=s3_credentials.access_key_id, secret_key=s3_credentials.secret_access_key,
        REFINE_AUDIT_DATA_DIR=str(tmp_path / "worker-data"), REFINE_AUDIT_SWEEP_INTERVAL_S="2",
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Every worker a test starts, stopped at the end whatever happened."""
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def queue(broker_url: str) -> CeleryQueue:
    return CeleryQueue(broker_url)


def start_worker(workers: list[ServiceProcess], env: dict[str, str], tmp_path: Path, **kwargs: object) -> ServiceProcess:
    process = start_celery_worker(env, tmp_path / f"worker-{len(workers)}.log", **kwargs)
    workers.append(process)
    wait_for(lambda: "ready." in process.log_path.read_text(errors="replace"), STARTUP_S,
             message="the worker to be ready", process=process)
    return process


def submit_mini(sessions: sessionmaker[Session], s3_store: S3Store, tmp_path: Path, spec: dict = MINI_SPEC) -> str:
    return submit(sessions, s3_store, new_owner(sessions), spec, tiny_checkpoint(tmp_path / "model.safetensors"))


def wait_until_training(sessions: sessionmaker[Session], audit_id: str, process: ServiceProcess) -> None:
    def training() -> bool:
        audit = load(sessions, audit_id)
        return audit.status == AuditStatus.RUNNING and audit.stage == "refine"

    wait_for(training, AUDIT_S, message="the audit to be training", process=process)


def wait_until_final(sessions: sessionmaker[Session], audit_id: str, timeout: float, process: ServiceProcess):
    return wait_for(lambda: (a := load(sessions, audit_id)) and is_terminal(AuditStatus(a.status)) and a, timeout,
                    message="a final status", process=process)


def test_worker_process_runs_an_audit_sent_by_the_web_queue(
    tmp_path: Path, worker_env: dict[str, str], workers: list[ServiceProcess], queue: CeleryQueue,
    sessions: sessionmaker[Session], s3_store: S3Store,
) -> None:
    worker = start_worker(workers, worker_env, tmp_path)
    audit_id = submit_mini(sessions, s3_store, tmp_path)

    started = time.monotonic()
    queue.enqueue(audit_id, "cpu")
    audit = wait_until_final(sessions, audit_id, AUDIT_S, worker)
    print(f"audit in the worker took {time.monotonic() - started:.1f} s")

    assert audit.status == AuditStatus.SUCCEEDED, (audit.error_code, audit.error_message, worker.log_tail())
    assert audit.attempts == 1 and audit.progress == 1.0
    assert s3_store.exists(artifact_key(audit_id, "report.json"))
    assert redis.Redis.from_url(queue.broker_url).llen("cpu") == 0  # consumed


def pool_children(process: ServiceProcess) -> list[int]:
    """The prefork pool's processes (Linux: /proc/<pid>/task/<tid>/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def test_killed_pool_process_audit_is_requeued_at_once_and_finishes(
    tmp_path: Path, worker_env: dict[str, str], workers: list[ServiceProcess], queue: CeleryQueue,
    sessions: sessionmaker[Session], s3_store: S3Store,
) -> None:
    # The OOM killer's way: only the process running the audit dies; the worker survives
    # and, with reject_on_worker_lost, puts the message straight back (no visibility wait).
    # The executor sees the heartbeat frozen for two keep-alive intervals (5 s each here)
    # and restarts the audit, before the sweep's 20 s heartbeat timeout would.
    env = {**worker_env, "REFINE_AUDIT_VISIBILITY_TIMEOUT_S": "3600", "REFINE_AUDIT_HEARTBEAT_TIMEOUT_S": "20"}
    worker = start_worker(workers, env, tmp_path)
    audit_id = submit_mini(sessions, s3_store, tmp_path, KILL_SPEC)
    queue.enqueue(audit_id, "cpu")
    wait_until_training(sessions, audit_id, worker)

    (child,) = pool_children(worker)
    os.kill(child, signal.SIGKILL)
    audit = wait_until_final(sessions, audit_id, AUDIT_S, worker)

    assert (audit.status, audit.attempts, audit.recoveries) == (AuditStatus.SUCCEEDED, 2, 1), (audit.error_code, worker.log_tail())


def test_audit_over_its_time_limit_fails_with_time_limit(
    tmp_path: Path, worker_env: dict[str, str], workers: list[ServiceProcess], queue: CeleryQueue,
    sessions: sessionmaker[Session], s3_store: S3Store,
) -> None:
    worker = start_worker(workers, {**worker_env, "REFINE_AUDIT_AUDIT_TIME_LIMIT_S": "2"}, tmp_path)
    audit_id = submit_mini(sessions, s3_store, tmp_path)
    queue.enqueue(audit_id, "cpu")

    audit = wait_until_final(sessions, audit_id, AUDIT_S, worker)

    assert (audit.status, audit.error_code) == (AuditStatus.FAILED, "time_limit"), worker.log_tail()
    assert "time limit of 2 s" in audit.error_message
