"""One audit split across two real Celery workers (``worker/parts.py``) on PostgreSQL, Redis and SeaweedFS.

Two one-process workers, as two machines would run them: the audit's main task takes one
worker, its positive-control tasks go to the queue, and the idle worker runs them. The
``audit_parts`` rows say which worker ran each control; the main task's own worker is in
the event that queued them. Cancelling the audit must stop every part, running or queued.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.processes import ServiceProcess, deployment_env, start_celery_worker, wait_for
from sqlalchemy.orm import Session, sessionmaker
from worker_support import (  # noqa: F401 (fixtures)
    FAST_OPTIONS, broker_url, load, new_owner, settings_for, submit, tiny_checkpoint, workers_database,
    workers_database_sessions,
)

from auditor.store import audits, parts
from auditor.store.artifacts import S3Credentials, S3Store, artifact_key
from auditor.store.control_cache import part_prefix
from auditor.store.db import session_scope
from auditor.store.lifecycle import AuditStatus, is_terminal
from web.jobs import CeleryQueue
from worker.executor import download_inputs, execute_audit
from worker.parts import Dispatch, execute_control_part

STARTUP_S = 180  # two workers importing torch on two busy shared cores
AUDIT_S = 420
CLEANUP_S = 60  # from a final status to the main task's cleanup, on two busy shared cores
CONTROLS = ["badnets", "blended"]
#: Tiny data, two positive controls; the main chain (detect, REFINE) outlasts the controls.
SPLIT_SPEC = {"effort": "tiny", "data": {"train_size": 200, "test_size": 100}, "probes": {"images": 20},
              "controls": {"attacks": CONTROLS}}
#: For the kill: controls long enough that the kill lands while the first one trains.
KILL_SPEC = {**SPLIT_SPEC, "controls": {"attacks": CONTROLS, "train_epochs": 30}}
#: For the cancel: REFINE and the controls long enough that the cancel lands while they run.
LONG_SPEC = {**SPLIT_SPEC, "refine": {"epochs": 200}, "controls": {"attacks": CONTROLS, "train_epochs": 200}}


@pytest.fixture
def two_workers(
    tmp_path: Path, workers_database: str, broker_url: str, s3_store: S3Store, s3_endpoint: str,
    s3_credentials: S3Credentials,
) -> Iterator[list[ServiceProcess]]:
    env = deployment_env(
        database_url=workers_database, broker_url=broker_url, bucket=s3_store.bucket, s3_endpoint=s3_endpoint,
        access_key=s3_credentials.access_key_id, secret_key=s3_credentials.secret_access_key,
        REFINE_AUDIT_DATA_DIR=str(tmp_path / "worker-data"), REFINE_AUDIT_SWEEP_INTERVAL_S="2",
        REFINE_AUDIT_CONTROL_CACHE="on", REFINE_AUDIT_SPLIT_AUDITS="on", REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="8",
        OMP_NUM_THREADS="1",
    )
    started: list[ServiceProcess] = []
    try:
        for name in ("split-a", "split-b"):
            started.append(start_celery_worker(env, tmp_path / f"{name}.log", hostname=f"{name}@%h"))
        for process in started:
            wait_for(lambda p=process: "ready." in p.log_path.read_text(errors="replace"), STARTUP_S,
                     message="the worker to be ready", process=process)
        yield started
    finally:
        for process in started:
            process.stop()


def part_rows(sessions: sessionmaker[Session], audit_id: str) -> dict[str, dict]:
    with session_scope(sessions) as session:
        return {p.name: parts.part_view(p) for p in parts.list_parts(session, audit_id)}


def main_worker(sessions: sessionmaker[Session], audit_id: str) -> str:
    with session_scope(sessions) as session:
        queued = [e for e in audits.list_events(session, audit_id) if e.kind == "part" and "queued" in e.message]
        return queued[0].data["worker"]


def logs(workers: list[ServiceProcess]) -> str:
    return "\n".join(w.log_tail() for w in workers)


def test_one_audit_runs_on_two_workers_and_a_cancel_stops_every_part(
    tmp_path: Path, two_workers: list[ServiceProcess], broker_url: str, sessions: sessionmaker[Session],
    s3_store: S3Store,
) -> None:
    queue = CeleryQueue(broker_url)
    owner = new_owner(sessions)
    model = tiny_checkpoint(tmp_path / "model.safetensors")

    # A split audit finishes, its controls trained by the other worker.
    audit_id = submit(sessions, s3_store, owner, SPLIT_SPEC, model)
    started = time.monotonic()
    queue.enqueue(audit_id, "cpu")
    audit = wait_for(lambda: (a := load(sessions, audit_id)) and is_terminal(AuditStatus(a.status)) and a, AUDIT_S,
                     message="a final status", process=two_workers[0])
    print(f"split audit took {time.monotonic() - started:.1f} s")
    assert audit.status == AuditStatus.SUCCEEDED, (audit.error_code, audit.error_message, logs(two_workers))
    assert audit.progress == 1.0
    assert set(audit.stage_detail["parts"]) == set(CONTROLS)  # the progress row showed where the controls ran
    rows = part_rows(sessions, audit_id)
    main = main_worker(sessions, audit_id)
    print("main task on", main, "parts:", rows)
    assert set(rows) == set(CONTROLS)
    done = [r for r in rows.values() if r["status"] == parts.DONE]
    assert done, (rows, logs(two_workers))  # at least one control trained by a control task ...
    assert all(r["worker"] != main and r["worker"].startswith("split-") for r in done)  # ... on the other worker
    assert all(r["status"] in (parts.DONE, parts.TAKEN) for r in rows.values())
    report = json.loads(s3_store.get_bytes(artifact_key(audit_id, "report.json")))
    origins = {c["attack"]: c["origin"] for c in report["positive_controls"]}
    assert set(origins) == set(CONTROLS)
    assert all(origins[r["name"]] == "reused" for r in done)  # the main task reused what the parts trained
    # The hand-over entries go with the finished audit: the main task deletes them right after recording its final
    # status (worker/executor.py, _cleanup), so a reader can see the status a moment before they are gone.
    wait_for(lambda: s3_store.list(part_prefix(audit_id)) == [], CLEANUP_S,
             message="the control tasks' entries to be deleted")

    # Cancelling a running split audit stops every part, running or still queued.
    audit_id = submit(sessions, s3_store, owner, LONG_SPEC, model)
    queue.enqueue(audit_id, "cpu")
    wait_for(lambda: any(r["status"] == parts.RUNNING for r in part_rows(sessions, audit_id).values()), AUDIT_S,
             message="a control task to be running", process=two_workers[0])
    with session_scope(sessions) as session:
        audits.request_cancel(session, audit_id)
    wait_for(lambda: all(r["status"] not in (parts.QUEUED, parts.RUNNING)
                         for r in part_rows(sessions, audit_id).values())
             and is_terminal(AuditStatus(load(sessions, audit_id).status)), 120,
             message="the audit and every part to stop", process=two_workers[0])
    rows = part_rows(sessions, audit_id)
    print("after cancel:", rows)
    assert load(sessions, audit_id).status == AuditStatus.CANCELLED
    assert all(r["status"] == parts.CANCELLED for r in rows.values()), rows


def pool_children(process: ServiceProcess) -> list[int]:
    """The prefork pool's processes (Linux: /proc/<pid>/task/<tid>/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def test_a_control_whose_worker_is_killed_is_run_again_and_the_audit_succeeds(
    tmp_path: Path, two_workers: list[ServiceProcess], broker_url: str, sessions: sessionmaker[Session],
    s3_store: S3Store,
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), KILL_SPEC, tiny_checkpoint(tmp_path / "m.safetensors"))
    CeleryQueue(broker_url).enqueue(audit_id, "cpu")
    running = wait_for(lambda: next((r for r in part_rows(sessions, audit_id).values()
                                     if r["status"] == parts.RUNNING), None), AUDIT_S,
                       message="a control task to be running", process=two_workers[0])
    host = next(w for w in two_workers if running["worker"].startswith(w.log_path.stem))
    (child,) = pool_children(host)
    os.kill(child, signal.SIGKILL)  # the OOM killer's way: the pool process dies, its worker lives on

    audit = wait_for(lambda: (a := load(sessions, audit_id)) and is_terminal(AuditStatus(a.status)) and a, AUDIT_S,
                     message="a final status", process=two_workers[0])
    rows = part_rows(sessions, audit_id)
    print("after the kill:", rows)
    assert audit.status == AuditStatus.SUCCEEDED, (audit.error_code, audit.error_message, logs(two_workers))
    killed = rows[running["name"]]
    # Run again: by the redelivered message once its heartbeat froze (attempt 2), or by the main task.
    assert (killed["status"], killed["attempts"]) in ((parts.DONE, 2), (parts.TAKEN, 1), (parts.TAKEN, 2)), rows
    report = json.loads(s3_store.get_bytes(artifact_key(audit_id, "report.json")))
    assert {c["attack"] for c in report["positive_controls"]} == set(CONTROLS)


def test_on_a_one_worker_cluster_the_audit_takes_back_the_controls_queued_behind_it(
    tmp_path: Path, workers_database: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials,
    sessions: sessionmaker[Session],
) -> None:
    # The control tasks are sent but no worker is free to run them (this one is busy with the audit itself):
    # the audit must not wait for them forever, it trains them itself once it needs them.
    settings = settings_for(tmp_path, workers_database, s3_store, s3_endpoint, s3_credentials, REFINE_AUDIT_CONTROL_CACHE="on",
                            REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="30")
    audit_id = submit(sessions, s3_store, new_owner(sessions), SPLIT_SPEC, tiny_checkpoint(tmp_path / "m.safetensors"))
    sent: list[str] = []
    execute_audit(audit_id, settings, store=s3_store, session_factory=sessions, options=FAST_OPTIONS,
                  dispatch=Dispatch(lambda _, name: sent.append(name), "only-worker"))

    audit = load(sessions, audit_id)
    assert audit.status == AuditStatus.SUCCEEDED, (audit.error_code, audit.error_message)
    assert sorted(sent) == sorted(CONTROLS)
    rows = part_rows(sessions, audit_id)
    assert {(r["status"], r["worker"]) for r in rows.values()} == {(parts.TAKEN, "only-worker")}, rows
    report = json.loads(s3_store.get_bytes(artifact_key(audit_id, "report.json")))
    assert {c["attack"]: c["origin"] for c in report["positive_controls"]} == dict.fromkeys(CONTROLS, "trained")
    # The control task's message, when a worker finally gets to it, finds nothing to do.
    assert execute_control_part(audit_id, "badnets", settings, store=lambda: s3_store, sessions=sessions,
                                runner=lambda *_: pytest.fail("a taken part ran"), worker="late-worker",
                                download=download_inputs) is None
