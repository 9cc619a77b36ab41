"""The executor on the real PostgreSQL and SeaweedFS: a real tiny audit end to end, and
the failure paths a user would see -- cancellation, domain errors, crashes, an artifact
store or database that is down, a redelivered or duplicate message, an audit whose
worker died (restarted from its checkpoints on another machine), a reaped audit."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from celery.exceptions import SoftTimeLimitExceeded
from shared_fixtures import database_call_broken_by
from sqlalchemy.orm import Session, sessionmaker
from worker_support import (  # noqa: F401 (fixtures)
    FAST_OPTIONS,
    TINY_SPEC,
    Receiver,
    events,
    load,
    new_owner,
    receiver,
    sessions,
    settings_for,
    submit,
    tiny_checkpoint,
)

from auditor import webhooks
from auditor.pipeline import ArtifactFile, AuditInputs, AuditResult
from auditor.settings import Settings
from auditor.spec import AuditSpec
from auditor.store import audits
from auditor.store.artifacts import S3Credentials, S3Store, artifact_key
from auditor.store.db import make_engine, make_session_factory, session_scope
from auditor.store.lifecycle import WORKER_LOST, AuditStatus
from auditor.store.models import utcnow
from auditor.store.webhooks import list_deliveries
from auditor.store.artifacts import checkpoint_prefix
from worker.executor import execute_audit, work_dir_for
from worker.infra import DatabaseUnavailable, StorageUnavailable

CLOSED_PORT_URL = "http://127.0.0.1:9"


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials) -> Settings:
    return settings_for(tmp_path, pg_url, s3_store, s3_endpoint, s3_credentials, REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="30")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "model.safetensors")


def run(audit_id: str, settings: Settings, store: Any, sessions: sessionmaker[Session], **kwargs: Any) -> None:
    execute_audit(audit_id, settings, store=store, session_factory=sessions, options=FAST_OPTIONS, **kwargs)


def run_in_thread(audit_id: str, settings: Settings, store: Any, sessions: sessionmaker[Session],
                  runner: Any) -> threading.Thread:
    """A worker running the audit beside the test."""
    worker = threading.Thread(target=run, args=(audit_id, settings, store, sessions), kwargs={"runner": runner})
    worker.start()
    return worker


def until(condition: Any, timeout_s: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def reap_an_hour_later(sessions: sessionmaker[Session], audit_id: str, max_retries: int) -> AuditStatus:
    """The sweep, seen from an hour later, when the live worker looks dead. Repeated, because
    that worker may hold the row lock for a heartbeat at that instant (SKIP LOCKED)."""
    reaped: dict[str, AuditStatus] = {}
    deadline = time.monotonic() + 30
    while audit_id not in reaped:
        assert time.monotonic() < deadline, "the sweep never got the row"
        with session_scope(sessions) as session:
            reaped = audits.reap_stale(session, timedelta(seconds=30), max_retries=max_retries,
                                       now=utcnow() + timedelta(hours=1))
    return reaped[audit_id]


class FakePipeline:
    """A stand-in for run_audit with real files, for the paths that do not need training."""

    def __init__(self, *, status: str = "succeeded", raises: BaseException | None = None, until_cancel: bool = False):
        self.status, self.raises, self.until_cancel = status, raises, until_cancel
        self.calls = 0
        self.progress: list[tuple[str, int, int]] = []

    def __call__(self, spec: AuditSpec, inputs: AuditInputs, on_progress, should_cancel, on_metrics) -> AuditResult:
        self.calls += 1
        out = Path(inputs.work_dir) / "out"
        out.mkdir(parents=True, exist_ok=True)
        for step in range(3):
            on_progress("refine", step, 3)
            self.progress.append(("refine", step, 3))
        if self.raises is not None:
            raise self.raises
        if self.until_cancel:
            deadline = time.monotonic() + 30
            while not should_cancel():
                assert time.monotonic() < deadline, "should_cancel never turned True"
                time.sleep(0.05)
            return AuditResult("cancelled", out, error={"code": "cancelled", "message": "The audit was cancelled."})
        files = {"report.json": b'{"status": "succeeded"}', "report.html": b"<html></html>", "audit.log": b"log"}
        artifacts = []
        for name, data in files.items():
            (out / name).write_bytes(data)
            artifacts.append(ArtifactFile(name, out / name, "report", "application/octet-stream"))
        error = None if self.status == "succeeded" else {"code": "invalid_dataset", "message": "bad data"}
        return AuditResult(self.status, out, {"status": self.status}, {"status": self.status, "ba_after": 0.9}, artifacts, error)


class SplitStore:
    """Reads inputs from the real store, writes artifacts to another (e.g. one that is down)."""

    def __init__(self, reads: S3Store, writes: S3Store):
        self.reads, self.writes = reads, writes

    def download_to(self, key: str, path: Path) -> None:
        self.reads.download_to(key, path)

    def list(self, prefix: str = "") -> list[str]:
        return self.reads.list(prefix)

    def put(self, *args: Any, **kwargs: Any) -> Any:
        return self.writes.put(*args, **kwargs)

    def delete_prefix(self, prefix: str) -> int:
        return self.writes.delete_prefix(prefix)


def dead_store(bucket: str, credentials: S3Credentials) -> S3Store:
    store = S3Store(bucket, endpoint_url=CLOSED_PORT_URL, credentials=credentials, create_bucket=False)
    store.client.meta.config.retries = {"max_attempts": 1}
    return store


# --- the real pipeline --------------------------------------------------------------------


def test_tiny_audit_succeeds_with_report_artifacts_progress_and_signed_webhook(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session], model_file: Path, receiver: Receiver
) -> None:
    owner = new_owner(sessions)
    audit_id = submit(sessions, s3_store, owner, {**TINY_SPEC, "callback_url": receiver.url}, model_file)

    started = time.monotonic()
    run(audit_id, settings, s3_store, sessions)
    print(f"tiny audit took {time.monotonic() - started:.1f} s")

    audit = load(sessions, audit_id)
    assert audit.status == AuditStatus.SUCCEEDED, (audit.error_code, audit.error_message)
    assert audit.progress == 1.0 and audit.attempts == 1 and audit.finished_at is not None
    assert audit.summary["status"] == "succeeded" and "ba_after" in audit.summary
    stages = [e.stage for e in events(sessions, audit_id) if e.kind == "stage"]
    assert stages[:5] == ["data", "load", "detect", "refine", "evaluate"]

    with session_scope(sessions) as session:
        records = {a.name: a for a in audits.list_artifacts(session, audit_id)}
    assert {"report.json", "report.html", "report.pdf", "defended_model.pt", "audit.log",
            "trigger-recovered.png"} <= set(records)
    for name, record in records.items():
        assert record.key == artifact_key(audit_id, name)
        assert s3_store.exists(record.key)
    report = s3_store.get_bytes(artifact_key(audit_id, "report.json"))
    assert b'"succeeded"' in report
    assert not work_dir_for(settings, audit_id).exists()  # scratch space freed once final

    (request,) = receiver.requests
    payload = request.json()
    assert payload["audit_id"] == audit_id and payload["status"] == "succeeded"
    assert payload["summary"] == audit.summary
    assert webhooks.verify(request.body, owner.webhook_secret, request.headers[webhooks.TIMESTAMP_HEADER],
                           request.headers[webhooks.SIGNATURE_HEADER])
    with session_scope(sessions) as session:
        assert [(d.status_code, d.succeeded) for d in list_deliveries(session, audit_id)] == [(200, True)]


def test_cancel_stops_running_audit_within_seconds(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session], model_file: Path
) -> None:
    owner = new_owner(sessions)
    audit_id = submit(sessions, s3_store, owner, TINY_SPEC, model_file)
    cancelled_at: list[float] = []

    def cancel_once_refining() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            audit = load(sessions, audit_id)
            if audit.status == AuditStatus.RUNNING and audit.stage in ("refine", "evaluate"):
                with session_scope(sessions) as session:
                    audits.request_cancel(session, audit_id)
                cancelled_at.append(time.monotonic())
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_once_refining)
    canceller.start()
    run(audit_id, settings, s3_store, sessions)
    stopped = time.monotonic()
    canceller.join()

    audit = load(sessions, audit_id)
    assert audit.status == AuditStatus.CANCELLED
    assert cancelled_at and stopped - cancelled_at[0] < 10, f"stopped {stopped - cancelled_at[0]:.1f} s after cancel"


def test_invalid_checkpoint_fails_with_its_error_code(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"definitely not a checkpoint")

    run(audit_id, settings, s3_store, sessions)

    audit = load(sessions, audit_id)
    assert audit.status == AuditStatus.FAILED
    assert audit.error_code == "invalid_checkpoint" and audit.error_message


# --- failure paths with a stand-in pipeline -------------------------------------------------


def test_redelivered_message_for_finished_audit_changes_nothing(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    pipeline = FakePipeline()
    run(audit_id, settings, s3_store, sessions, runner=pipeline)
    first = load(sessions, audit_id)

    run(audit_id, settings, s3_store, sessions, runner=pipeline)

    again = load(sessions, audit_id)
    assert pipeline.calls == 1
    assert (again.status, again.attempts, again.finished_at) == (AuditStatus.SUCCEEDED, 1, first.finished_at)


def test_message_for_an_audit_whose_worker_died_restarts_it_once_frozen_heartbeat_is_seen(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    # What Celery does when a pool process is killed: the message comes straight back.
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    with session_scope(sessions) as session:
        audits.mark_running(session, audit_id)  # attempt 1 "died" here: its heartbeat never moves again

    started = time.monotonic()
    run(audit_id, settings, s3_store, sessions, runner=FakePipeline())

    audit = load(sessions, audit_id)
    assert (audit.status, audit.attempts, audit.recoveries) == (AuditStatus.SUCCEEDED, 2, 1)
    assert any("restarting from the last checkpoint" in e.message for e in events(sessions, audit_id))
    assert time.monotonic() - started < 15  # a few keep-alive intervals, not the heartbeat timeout


def test_duplicate_message_for_an_audit_a_live_worker_runs_is_dropped(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    first = FakePipeline(until_cancel=True)
    worker = run_in_thread(audit_id, settings, s3_store, sessions, first)
    until(lambda: load(sessions, audit_id).status == AuditStatus.RUNNING, what="the audit to run")

    duplicate = FakePipeline()
    run(audit_id, settings, s3_store, sessions, runner=duplicate)  # watches the heartbeat move, then gives up

    with session_scope(sessions) as session:
        audits.request_cancel(session, audit_id)
    worker.join(timeout=30)
    audit = load(sessions, audit_id)
    assert duplicate.calls == 0 and first.calls == 1
    assert (audit.status, audit.attempts, audit.recoveries) == (AuditStatus.CANCELLED, 1, 0)


class Checkpointing(FakePipeline):
    """Writes a REFINE checkpoint, then trains on until the audit is taken away from it."""

    def __init__(self, store: S3Store, audit_id: str):
        super().__init__(until_cancel=True)
        self.key = checkpoint_prefix(audit_id) + "refine_checkpoint.pt"
        self.store = store

    def __call__(self, spec, inputs, on_progress, should_cancel, on_metrics):  # type: ignore[override]
        (Path(inputs.work_dir) / "refine").mkdir(parents=True, exist_ok=True)
        (Path(inputs.work_dir) / "refine" / "refine_checkpoint.pt").write_bytes(b"epoch 3 of 6")
        until(lambda: self.store.exists(self.key), what="the keep-alive thread to mirror the checkpoint")
        return super().__call__(spec, inputs, on_progress, should_cancel, on_metrics)


class Resuming(FakePipeline):
    def __call__(self, spec, inputs, on_progress, should_cancel, on_metrics):  # type: ignore[override]
        checkpoint = Path(inputs.work_dir) / "refine" / "refine_checkpoint.pt"
        self.found = checkpoint.read_bytes() if checkpoint.exists() else None
        return super().__call__(spec, inputs, on_progress, should_cancel, on_metrics)


def test_restart_on_another_machine_resumes_from_the_checkpoints_the_lost_worker_mirrored(
    tmp_path: Path, pg_url: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials,
    sessions: sessionmaker[Session],
) -> None:
    machine_a, machine_b = (
        settings_for(tmp_path / name, pg_url, s3_store, s3_endpoint, s3_credentials, REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="30")
        for name in ("a", "b")
    )
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    lost = Checkpointing(s3_store, audit_id)
    worker_a = run_in_thread(audit_id, machine_a, s3_store, sessions, lost)
    until(lambda: s3_store.exists(lost.key), what="the checkpoint in S3")

    # Machine A stops answering: the sweep restarts the audit.
    assert reap_an_hour_later(sessions, audit_id, max_retries=1) == AuditStatus.QUEUED
    resumed = Resuming()
    run(audit_id, machine_b, s3_store, sessions, runner=resumed)
    worker_a.join(timeout=30)

    audit = load(sessions, audit_id)
    assert resumed.found == b"epoch 3 of 6"
    assert (audit.status, audit.attempts, audit.recoveries) == (AuditStatus.SUCCEEDED, 2, 1)
    assert any(e.kind == "checkpoint" and "refine_checkpoint.pt" in e.message for e in events(sessions, audit_id))
    assert s3_store.list(checkpoint_prefix(audit_id)) == []  # the audit is final: its checkpoints are gone
    assert not worker_a.is_alive()


def test_progress_is_written_while_running_and_never_exceeds_one(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    seen: list[tuple[str | None, float]] = []

    class Watching(FakePipeline):
        def __call__(self, spec, inputs, on_progress, should_cancel, on_metrics):  # type: ignore[override]
            for stage, steps in (("data", 1), ("load", 1), ("refine", 4), ("evaluate", 2)):
                for done in range(steps + 1):
                    on_progress(stage, done, steps)
                    time.sleep(0.25)  # beyond the throttle, so each step is written
                    audit = load(sessions, audit_id)
                    seen.append((audit.stage, audit.progress))
            return super().__call__(spec, inputs, on_progress, should_cancel, on_metrics)

    run(audit_id, settings, s3_store, sessions, runner=Watching())

    values = [p for _, p in seen]
    assert values == sorted(values) and 0 < values[-1] <= 1
    assert {"data", "load", "refine", "evaluate"} <= {stage for stage, _ in seen}
    assert load(sessions, audit_id).progress == 1.0


def test_unexpected_exception_is_recorded_then_reraised(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")

    with pytest.raises(ZeroDivisionError):
        run(audit_id, settings, s3_store, sessions, runner=FakePipeline(raises=ZeroDivisionError("boom")))

    audit = load(sessions, audit_id)
    assert audit.status == AuditStatus.FAILED
    assert audit.error_code == "internal_error" and "boom" in audit.error_message


def test_time_limit_inside_a_database_call_fails_time_limit_instead_of_retrying(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")

    with pytest.raises(SoftTimeLimitExceeded):  # Celery's handler for the limit, not a retry
        run(audit_id, settings, s3_store, sessions, final_attempt=False,
            runner=FakePipeline(raises=database_call_broken_by(SoftTimeLimitExceeded())))

    audit = load(sessions, audit_id)
    assert (audit.status, audit.error_code) == (AuditStatus.FAILED, "time_limit")


def test_domain_failure_from_pipeline_is_recorded_with_its_code(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    run(audit_id, settings, s3_store, sessions, runner=FakePipeline(status="failed"))
    audit = load(sessions, audit_id)
    assert (audit.status, audit.error_code, audit.error_message) == (AuditStatus.FAILED, "invalid_dataset", "bad data")
    assert s3_store.exists(artifact_key(audit_id, "report.json"))  # the report of a failure is kept


def test_storage_down_during_upload_is_retried_then_failed_never_succeeded(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session], s3_credentials: S3Credentials
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    broken = SplitStore(s3_store, dead_store(s3_store.bucket, s3_credentials))

    # Not the last try: the task will retry, so the row goes back to queued for that retry.
    with pytest.raises(StorageUnavailable):
        run(audit_id, settings, broken, sessions, runner=FakePipeline(), final_attempt=False)
    assert load(sessions, audit_id).status == AuditStatus.QUEUED
    assert work_dir_for(settings, audit_id).exists()  # kept for the retry to resume from

    # The last try records storage_unavailable.
    with pytest.raises(StorageUnavailable):
        run(audit_id, settings, broken, sessions, runner=FakePipeline(), final_attempt=True)
    audit = load(sessions, audit_id)
    assert (audit.status, audit.error_code, audit.attempts) == (AuditStatus.FAILED, "storage_unavailable", 2)
    assert not s3_store.exists(artifact_key(audit_id, "report.json"))
    with session_scope(sessions) as session:
        assert audits.list_artifacts(session, audit_id) == []


def test_storage_back_on_retry_succeeds_with_a_complete_report(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session], s3_credentials: S3Credentials
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")

    class FailsOnReport(SplitStore):
        """The store dies right when the report is due: everything else is already up."""

        def put(self, key: str, *args: Any, **kwargs: Any) -> Any:
            if key.endswith("/report.json"):
                raise EndpointConnectionError(endpoint_url=CLOSED_PORT_URL)
            return self.reads.put(key, *args, **kwargs)

    with pytest.raises(StorageUnavailable):
        run(audit_id, settings, FailsOnReport(s3_store, s3_store), sessions, runner=FakePipeline(), final_attempt=False)
    assert load(sessions, audit_id).status == AuditStatus.QUEUED  # never succeeded without its report
    assert not s3_store.exists(artifact_key(audit_id, "report.json"))

    run(audit_id, settings, s3_store, sessions, runner=FakePipeline())

    audit = load(sessions, audit_id)
    assert (audit.status, audit.attempts) == (AuditStatus.SUCCEEDED, 2)
    assert s3_store.get_bytes(artifact_key(audit_id, "report.json")) == b'{"status": "succeeded"}'


def test_database_down_raises_database_unavailable(settings: Settings, s3_store: S3Store) -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere", connect_args={"connect_timeout": 2})
    try:
        with pytest.raises(DatabaseUnavailable) as info:
            run("00000000-0000-0000-0000-000000000000", settings, s3_store, make_session_factory(engine),
                runner=FakePipeline())
    finally:
        engine.dispose()
    assert info.value.code.value == "database_unavailable"


def test_reaper_fails_silent_audit_and_its_late_worker_stops_without_overwriting(
    settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session]
) -> None:
    audit_id = submit(sessions, s3_store, new_owner(sessions), TINY_SPEC, b"m")
    worker = run_in_thread(audit_id, settings, s3_store, sessions, FakePipeline(until_cancel=True))
    until(lambda: load(sessions, audit_id).status == AuditStatus.RUNNING, what="the audit to run")

    assert reap_an_hour_later(sessions, audit_id, max_retries=0) == AuditStatus.FAILED  # no restarts left
    worker.join(timeout=30)

    assert not worker.is_alive()
    audit = load(sessions, audit_id)
    assert (audit.status, audit.error_code) == (AuditStatus.FAILED, WORKER_LOST)  # not overwritten by "cancelled"
