"""One audit, start to finish, around ``auditor.pipeline.run_audit``.

The Celery task (``worker.tasks.run_audit``) and the web app's in-process queue both
call ``execute_audit(audit_id, settings)``; everything that makes a run safe to repeat
lives here, in this order (short sessions around long work, record then re-raise):

1. **Claim** (short session): only a ``queued`` row is claimed (``mark_running``,
   attempts + 1), so of two messages for one audit only the first runs it. A terminal
   row means the work is done: only its webhook, if still owed, is attempted. A
   ``running`` row belongs to another attempt: if its heartbeat moves, this message is
   a duplicate and is dropped; if it stays frozen for a few keep-alive intervals, that
   attempt's worker is dead (e.g. the pool process was killed and Celery handed the
   message back) and the audit is recovered -- restarted while it has restarts left,
   else failed with ``worker_lost`` -- exactly as the sweep would, only sooner.
2. **Inputs**: download ``audits/{id}/inputs/model`` and ``.../dataset`` into a work dir
   at a stable path per audit, and restore the REFINE checkpoints a previous attempt
   mirrored to the store, so a restart on any machine resumes from its last epoch.
3. **Run** the pipeline with callbacks bound to the row (``worker.progress``); the
   keep-alive thread heart-beats and mirrors new checkpoints to the store.
4. **Publish**: upload every artifact to its fixed key (a re-run overwrites), the JSON
   report last, record them, and only then mark the row ``succeeded`` -- so a row never
   says ``succeeded`` while its report is missing or half-written.
5. **Notify**: the transaction that ended the audit recorded the webhook it owes; the
   executor makes the first attempt, the sweep any retries (``worker.notify``).

On a Celery worker (``dispatch`` given, ``Settings.split_audits``) step 3 also sends the
audit's positive controls to other workers as their own tasks and collects their
results while the pipeline runs (``worker.parts``); step 4's cleanup closes them.

Failures: a domain error or a cancel comes back in the result and is recorded as such;
an unexpected exception is recorded as ``internal_error`` and re-raised; a transient
infrastructure error (S3 or the database unreachable) is raised as
``TransientInfraError`` for the task to retry -- the row goes back to ``queued`` for
that retry to claim -- and is recorded as ``storage_unavailable`` or
``database_unavailable`` only on the last attempt.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from auditor.errors import AuditError, ErrorCode
from auditor.logs import audit_log_context
from auditor.pipeline import ArtifactFile, AuditInputs, AuditResult, run_audit
from auditor.settings import Settings
from auditor.spec import AuditSpec, parse_spec
from auditor.store import audits as rows
from auditor.store.artifacts import ArtifactNotFound, ArtifactStore, artifact_key, input_key, store_from_url
from auditor.store.control_cache import part_prefix, run_with_control_cache
from auditor.store.db import make_engine, make_session_factory, session_scope
from auditor.store.lifecycle import AuditStatus, is_terminal
from worker.checkpoints import CheckpointMirror, discard_checkpoints
from worker.infra import interrupted_by_time_limit, transient_error
from worker.notify import WebhookPolicy, deliver_webhook
from worker.parts import ControlParts, Dispatch, close_parts
from worker.progress import KeepAlive, RowLink, planned_stage_weights

log = logging.getLogger(__name__)

Runner = Callable[..., AuditResult]
REPORT_JSON = "report.json"


def work_dir_for(settings: Settings, audit_id: str) -> Path:
    """Stable per audit, so a redelivered run finds the previous attempt's checkpoints."""
    return settings.data_dir / "work" / audit_id


@dataclass(frozen=True)
class ExecutorOptions:
    """Knobs the tests turn down; the defaults suit production."""

    progress_interval_s: float = 1.0  # at most one progress/cancel round trip per second
    keepalive_interval_s: float = 15.0  # heartbeat even when the pipeline reports nothing
    upload_attempts: int = 3  # in-process tries per artifact before the task-level retry
    upload_backoff_s: float = 1.0  # doubled after each failed try
    webhook_policy: WebhookPolicy = WebhookPolicy()
    keep_work_dir: bool = False  # keep scratch files of finished audits (debugging)

    def keepalive_s(self, heartbeat_timeout_s: int) -> float:
        """Several beats fit in the heartbeat timeout, so one lost write never looks like a death."""
        return min(self.keepalive_interval_s, max(1.0, heartbeat_timeout_s / 4))

    def abandoned_after_s(self, heartbeat_timeout_s: int) -> float:
        """How long a running audit's heartbeat must stay frozen before its worker counts as dead."""
        return min(float(heartbeat_timeout_s), 2 * self.keepalive_s(heartbeat_timeout_s) + 2.0)


def execute_audit(
    audit_id: str,
    settings: Settings,
    *,
    store: ArtifactStore | Callable[[], ArtifactStore] | None = None,
    session_factory: sessionmaker[Session] | None = None,
    final_attempt: bool = True,
    runner: Runner = run_audit,
    options: ExecutorOptions = ExecutorOptions(),
    dispatch: Dispatch | None = None,
) -> None:
    """Run one audit to a final status (see the module docstring for the guarantees).

    ``final_attempt=False`` (the Celery task while it still has retries) hands the row
    back to ``queued`` on a transient infrastructure error, for the retry to claim;
    otherwise the error is recorded before it propagates. ``store`` may be a factory, called on first
    use inside the error handling (building an S3 store already talks to S3).
    ``runner`` replaces ``run_audit`` in tests. ``dispatch`` (Celery workers only) lets the
    audit send its positive controls to other workers (``worker/parts.py``).
    """
    engine = None
    if session_factory is None:
        engine = make_engine(settings.database_url)
        session_factory = make_session_factory(engine)
    try:
        with audit_log_context(audit_id):
            executor = AuditExecutor(audit_id, settings, store, session_factory, runner, options, dispatch)
            executor.run(final_attempt=final_attempt)
    finally:
        if engine is not None:
            engine.dispose()


def download_inputs(store: ArtifactStore, audit_id: str, work_dir: Path) -> tuple[Path | None, Path | None]:
    """The audit's model and dataset files (None when it has none) under ``work_dir/inputs``."""
    inputs = work_dir / "inputs"
    paths: list[Path | None] = []
    for name in ("model", "dataset"):
        target = inputs / name
        try:
            store.download_to(input_key(audit_id, name), target)
            paths.append(target)
        except ArtifactNotFound:
            paths.append(None)
    return paths[0], paths[1]


@dataclass(frozen=True)
class _Claim:
    """What the claim found: a spec to run, or nothing to run (and whether the audit is final)."""

    spec: dict[str, Any] | None = None
    final: bool = False


class AuditExecutor:
    """The phases of ``execute_audit``; one instance per attempt."""

    def __init__(
        self,
        audit_id: str,
        settings: Settings,
        store: ArtifactStore | Callable[[], ArtifactStore] | None,
        sessions: sessionmaker[Session],
        runner: Runner = run_audit,
        options: ExecutorOptions = ExecutorOptions(),
        dispatch: Dispatch | None = None,
    ):
        self.audit_id = audit_id
        self.dispatch = dispatch
        self.settings = settings
        self._store = store
        self.sessions = sessions
        self.runner = runner
        self.options = options
        self.attempt = 0

    @property
    def store(self) -> ArtifactStore:
        """Built on first use: creating an S3 client touches the network (bucket check)."""
        if self._store is None:
            self._store = store_from_url(self.settings.artifacts_url, self.settings)
        elif callable(self._store):
            self._store = self._store()
        return self._store

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.settings, self.audit_id)

    def run(self, *, final_attempt: bool = True) -> None:
        with self._infra_guard(final_attempt):
            spec = self._start()
            if spec is None:
                return
            result = self._run_pipeline(spec, self.work_dir)
            status = self._publish(result)
            if status is not None:  # None: a newer attempt may be using the same work dir
                self._cleanup()
                self._notify()

    # -- 1 claim ----------------------------------------------------------------------------

    def _start(self) -> AuditSpec | None:
        """Claim the row and parse its spec; None when there is nothing (left) to do."""
        claim = self._claim()
        if claim.final:
            self._discard_checkpoints()  # left behind if the finishing worker died before its cleanup
            self._notify()
        if claim.spec is None:
            return None
        log.info("audit %s: attempt %d started", self.audit_id, self.attempt)
        try:
            return parse_spec(claim.spec)
        except AuditError as exc:  # the web validated it, but a stored spec can predate a change
            code, message = exc.code, exc.message
        self._finish(lambda s: rows.mark_failed(s, self.audit_id, code, message))
        self._notify()
        return None

    def _claim(self) -> _Claim:
        with session_scope(self.sessions) as session:
            try:
                audit = rows.get_audit(session, self.audit_id, for_update=True)
            except rows.AuditNotFound:
                log.info("audit %s was deleted; nothing to do", self.audit_id)
                return _Claim()
            status = AuditStatus(audit.status)
            if is_terminal(status):
                log.info("audit %s is already %s; nothing to do", self.audit_id, status.value)
                return _Claim(final=True)
            if status == AuditStatus.QUEUED:
                return self._claim_queued(session)
            seen = (audit.attempts, audit.heartbeat_at)
        return self._claim_abandoned(seen)

    def _claim_queued(self, session: Session) -> _Claim:
        audit = rows.mark_running(session, self.audit_id)
        self.attempt = audit.attempts
        return _Claim(spec=dict(audit.spec))

    def _claim_abandoned(self, seen: tuple[int, Any]) -> _Claim:
        """Another attempt holds the row: wait to see whether its worker is alive."""
        wait_s = self.options.abandoned_after_s(self.settings.heartbeat_timeout_s)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, wait_s / 4))
            with session_scope(self.sessions) as session:
                audit = rows.get_audit(session, self.audit_id)
                if AuditStatus(audit.status) != AuditStatus.RUNNING or (audit.attempts, audit.heartbeat_at) != seen:
                    log.info("audit %s is in the hands of a live worker; dropping this duplicate message", self.audit_id)
                    return _Claim()
        with session_scope(self.sessions) as session:
            audit = rows.get_audit(session, self.audit_id, for_update=True)
            if AuditStatus(audit.status) != AuditStatus.RUNNING or (audit.attempts, audit.heartbeat_at) != seen:
                return _Claim()
            silence = timedelta(seconds=wait_s)
            status = rows.recover_lost(session, audit, self.settings.lost_worker_retries, silence)
            log.warning("audit %s: its worker died (heartbeat frozen for %.0f s); now %s", self.audit_id, wait_s,
                        status.value)
            if status == AuditStatus.QUEUED:
                return self._claim_queued(session)
        return _Claim(final=True)

    # -- 2 inputs and 3 run -----------------------------------------------------------------

    def _run_pipeline(self, spec: AuditSpec, work_dir: Path) -> AuditResult:
        model_path, dataset_path = download_inputs(self.store, self.audit_id, work_dir)
        inputs = AuditInputs(
            work_dir=work_dir,
            model_path=model_path,
            dataset_path=dataset_path,
            allowed_hosts=self.settings.allowed_hosts,
            audit_id=self.audit_id,
            device=self.settings.device,
            fmnist_dir=self.settings.fmnist_dir,
            cache_dir=self.settings.data_dir,
        )
        mirror = CheckpointMirror(lambda: self.store, self.audit_id, work_dir / "refine")
        self._restore_checkpoints(mirror)
        link = RowLink(
            self.sessions, self.audit_id, self.attempt,
            planned_stage_weights(spec, dataset_path, self.settings.device),
            interval_s=self.options.progress_interval_s,
        )
        keepalive = self.options.keepalive_s(self.settings.heartbeat_timeout_s)
        parts = self._parts(link)
        chores = mirror.sync if parts is None else lambda: (mirror.sync(), parts.sync())
        try:
            with KeepAlive(link, keepalive, after_beat=chores):
                if self.settings.control_cache:  # cached positive controls fetched before, new ones published after
                    runner = self.runner if parts is None else parts.wrap(self.runner)
                    return run_with_control_cache(runner, self.store, spec, inputs, link.on_progress,
                                                  link.should_cancel, link.on_metrics)
                return self.runner(spec, inputs, link.on_progress, link.should_cancel, link.on_metrics)
        finally:
            mirror.close()  # before the cleanup deletes the stored copies: a late upload would outlive it

    def _parts(self, link: RowLink) -> ControlParts | None:
        """The audit's positive controls as separate tasks: Celery workers only, and only over the control cache
        (the cache is how their results reach this task)."""
        if self.dispatch is None or not (self.settings.split_audits and self.settings.control_cache):
            return None
        stale_after = timedelta(seconds=self.options.abandoned_after_s(self.settings.heartbeat_timeout_s))
        return ControlParts(self.audit_id, self.sessions, lambda: self.store, self.dispatch, stale_after, link.on_parts)

    def _restore_checkpoints(self, mirror: CheckpointMirror) -> None:
        restored = mirror.restore()
        if restored:
            message = f"Restored the checkpoints of an earlier attempt ({', '.join(restored)}); REFINE resumes from them."
            log.info("audit %s: %s", self.audit_id, message)
            with session_scope(self.sessions) as session:
                rows.record_event(session, self.audit_id, "checkpoint", message, data={"restored": restored})

    # -- 4 publish --------------------------------------------------------------------------

    def _publish(self, result: AuditResult) -> AuditStatus | None:
        """Upload, record and set the final status; None when the row was no longer ours."""
        if result.status == "succeeded":
            infos = self._upload_all(result.artifacts)  # raises: the row never says succeeded
            return self._finish(lambda s: self._record_success(s, result, infos))
        infos = self._upload_best_effort(result.artifacts)  # the report of a failure helps, but is optional
        error = result.error or {}
        if result.status == "cancelled":
            return self._finish(lambda s: self._record_end(s, infos, cancelled=True))
        code, message = error.get("code") or ErrorCode.INTERNAL_ERROR.value, error.get("message") or "The audit failed."
        return self._finish(lambda s: self._record_end(s, infos, code=code, message=message))

    def _ordered(self, artifacts: list[ArtifactFile]) -> list[ArtifactFile]:
        """The JSON report last: its presence is what says the upload completed."""
        return sorted(artifacts, key=lambda a: a.name == REPORT_JSON)

    def _upload_all(self, artifacts: list[ArtifactFile]) -> list[tuple[ArtifactFile, Any]]:
        return [(a, self._upload(a)) for a in self._ordered(artifacts)]

    def _upload_best_effort(self, artifacts: list[ArtifactFile]) -> list[tuple[ArtifactFile, Any]]:
        uploaded = []
        for artifact in self._ordered(artifacts):
            try:
                uploaded.append((artifact, self._upload(artifact)))
            except Exception as exc:  # noqa: BLE001 -- the audit's own outcome matters more
                log.warning("audit %s: artifact %s not uploaded: %s", self.audit_id, artifact.name, exc)
        return uploaded

    def _upload(self, artifact: ArtifactFile) -> Any:
        """Retry a flaky store a few times here; a store that stays down goes to the task's retry."""
        delay = self.options.upload_backoff_s
        for attempt in range(1, self.options.upload_attempts + 1):
            try:
                return self.store.put(artifact_key(self.audit_id, artifact.name), artifact.path, artifact.content_type)
            except Exception as exc:
                if transient_error(exc) is None or attempt == self.options.upload_attempts:
                    raise
                log.warning("audit %s: upload of %s failed (%s); retrying", self.audit_id, artifact.name, exc)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _record_artifacts(self, session: Session, infos: list[tuple[ArtifactFile, Any]]) -> None:
        for artifact, info in infos:
            rows.add_artifact(
                session, self.audit_id, name=artifact.name, info=info, kind=artifact.kind,
                content_type=artifact.content_type,
            )

    def _record_success(self, session: Session, result: AuditResult, infos: list[tuple[ArtifactFile, Any]]) -> Any:
        self._record_artifacts(session, infos)
        return rows.mark_succeeded(session, self.audit_id, result.summary)

    def _record_end(
        self, session: Session, infos: list[tuple[ArtifactFile, Any]], *, cancelled: bool = False,
        code: str = "", message: str = "",
    ) -> Any:
        self._record_artifacts(session, infos)
        if cancelled:
            return rows.mark_cancelled(session, self.audit_id)
        return rows.mark_failed(session, self.audit_id, code, message)

    def _finish(self, write: Callable[[Session], Any]) -> AuditStatus | None:
        """Apply a final write unless the row moved on (reaped, cancelled, or a newer attempt)."""
        with session_scope(self.sessions) as session:
            audit = rows.get_audit(session, self.audit_id, for_update=True)
            if audit.attempts != self.attempt or AuditStatus(audit.status) != AuditStatus.RUNNING:
                log.warning(
                    "audit %s: not recording attempt %d's outcome; the row is %s at attempt %d",
                    self.audit_id, self.attempt, audit.status.value, audit.attempts,
                )
                return None
            write(session)
            status = AuditStatus(audit.status)
        log.info("audit %s: %s", self.audit_id, status.value)
        return status

    def _cleanup(self) -> None:
        """Scratch files, mirrored checkpoints and parts' entries go once the audit is final (kept until then to
        resume from)."""
        self._discard_checkpoints()
        close_parts(self.sessions, self.audit_id)
        try:
            self.store.delete_prefix(part_prefix(self.audit_id))
        except Exception as exc:  # noqa: BLE001 -- leftovers go with the audit's files when it is deleted
            log.warning("audit %s: entries of its control tasks not deleted: %s", self.audit_id, exc)
        if not self.options.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _discard_checkpoints(self) -> None:
        try:
            discard_checkpoints(self.store, self.audit_id)
        except Exception as exc:  # noqa: BLE001 -- leftovers go with the audit's files when it is deleted
            log.warning("audit %s: stored checkpoints not deleted: %s", self.audit_id, exc)

    # -- failures ---------------------------------------------------------------------------

    @contextmanager
    def _infra_guard(self, final_attempt: bool) -> Iterator[None]:
        """Record, then re-raise: transient errors as ``TransientInfraError``, the rest as internal."""
        try:
            yield
        except SoftTimeLimitExceeded:
            self._record_failure(ErrorCode.TIME_LIMIT.value, self._time_limit_message())
            raise
        except Exception as exc:
            if interrupted_by_time_limit(exc):
                self._record_failure(ErrorCode.TIME_LIMIT.value, self._time_limit_message())
                raise SoftTimeLimitExceeded() from exc
            transient = transient_error(exc)
            if transient is not None:
                if final_attempt:
                    self._record_failure(transient.code.value, transient.message)
                else:
                    self._requeue_for_retry(transient.message)
                if transient is exc:
                    raise
                raise transient from exc
            self._record_failure(ErrorCode.INTERNAL_ERROR.value, f"{type(exc).__name__}: {exc}")
            raise

    def _time_limit_message(self) -> str:
        return f"The audit exceeded its time limit of {self.settings.audit_time_limit_s} s."

    def _record_failure(self, code: str, message: str) -> None:
        """Best effort: when even this write fails, the sweep recovers the row later."""
        try:
            with session_scope(self.sessions) as session:
                audit = rows.get_audit(session, self.audit_id, for_update=True)
                ours = AuditStatus(audit.status) == AuditStatus.RUNNING and audit.attempts == self.attempt
                if not (ours or AuditStatus(audit.status) == AuditStatus.QUEUED):  # queued: failed before starting
                    return
                rows.mark_failed(session, self.audit_id, code, message)
        except Exception as exc:  # noqa: BLE001 -- the original error is the one to raise
            log.error("audit %s: could not record failure %s (%s)", self.audit_id, code, exc)
            return
        self._cleanup()
        self._notify()

    def _requeue_for_retry(self, reason: str) -> None:
        """Hand the row back to ``queued`` for the task's retry to claim; best effort, like ``_record_failure``."""
        try:
            with session_scope(self.sessions) as session:
                rows.requeue_for_retry(session, self.audit_id, self.attempt, reason)
        except Exception as exc:  # noqa: BLE001 -- the retry then finds the row running and recovers it
            log.error("audit %s: could not requeue for a retry (%s)", self.audit_id, exc)

    # -- 5 notify ---------------------------------------------------------------------------

    def _notify(self) -> None:
        """The first attempt at the webhook the audit owes, if any; the sweep retries. Never raises."""
        try:
            deliver_webhook(self.sessions, self.audit_id, self.settings.allowed_hosts, self.options.webhook_policy)
        except Exception as exc:  # noqa: BLE001 -- the audit is final either way; the sweep tries again
            log.warning("audit %s: webhook not delivered yet: %s", self.audit_id, exc)
