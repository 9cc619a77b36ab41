"""One audit, start to finish, around ``auditor.pipeline.run_audit``.

The Celery task (``worker.tasks.run_audit``) and the web app's in-process queue both
call ``execute_audit(audit_id, settings)``; everything that makes a run safe to repeat
lives here, in the order STYLE.md asks for:

1. **Start** (short session): load the row; a terminal row means a redelivered message
   whose work is already done, so return. Otherwise ``mark_running`` (attempts + 1) and
   read the spec, then close the session before any heavy work.
2. **Inputs**: download ``audits/{id}/inputs/model`` and ``.../dataset`` into a work dir
   at a stable path per audit, so a redelivered run resumes REFINE from its last epoch
   checkpoint instead of starting over.
3. **Run** the pipeline with callbacks bound to the row (``worker.progress``).
4. **Publish**: upload every artifact to its fixed key (a re-run overwrites), the JSON
   report last, record them, and only then mark the row ``succeeded`` -- so a row never
   says ``succeeded`` while its report is missing or half-written.
5. **Notify**: the completion webhook, after the final status is committed.

Failures: a domain error or a cancel comes back in the result and is recorded as such;
an unexpected exception is recorded as ``internal_error`` and re-raised; a transient
infrastructure error (S3 or the database unreachable) is raised as
``TransientInfraError`` for the task to retry, and recorded as ``storage_unavailable``
or ``database_unavailable`` only on the last attempt.
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
from auditor.pipeline import ArtifactFile, AuditInputs, AuditResult, run_audit
from auditor.settings import Settings
from auditor.spec import AuditSpec, parse_spec
from auditor.store import audits as rows
from auditor.store.artifacts import ArtifactNotFound, ArtifactStore, artifact_key, input_key, store_from_url
from auditor.store.db import make_engine, make_session_factory, session_scope
from auditor.store.lifecycle import WORKER_LOST, AuditStatus, is_terminal
from auditor.store.models import utcnow
from auditor.store.webhooks import delivery_count, record_delivery, webhook_secret_for
from auditor.webhooks import DeliveryAttempt, deliver
from worker.infra import transient_error
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
    webhook_attempts: int = 5
    webhook_backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    keep_work_dir: bool = False  # keep scratch files of finished audits (debugging)


def execute_audit(
    audit_id: str,
    settings: Settings,
    *,
    store: ArtifactStore | Callable[[], ArtifactStore] | None = None,
    session_factory: sessionmaker[Session] | None = None,
    final_attempt: bool = True,
    runner: Runner = run_audit,
    options: ExecutorOptions = ExecutorOptions(),
) -> None:
    """Run one audit to a final status (see the module docstring for the guarantees).

    ``final_attempt=False`` (the Celery task while it still has retries) leaves the row
    running on a transient infrastructure error, for the retry to pick up; otherwise the
    error is recorded before it propagates. ``store`` may be a factory, called on first
    use inside the error handling (building an S3 store already talks to S3).
    ``runner`` replaces ``run_audit`` in tests.
    """
    engine = None
    if session_factory is None:
        engine = make_engine(settings.database_url)
        session_factory = make_session_factory(engine)
    try:
        executor = AuditExecutor(audit_id, settings, store, session_factory, runner, options)
        executor.run(final_attempt=final_attempt)
    finally:
        if engine is not None:
            engine.dispose()


def reap_stale_audits(session_factory: sessionmaker[Session], heartbeat_timeout_s: int) -> list[str]:
    """Fail running audits whose worker went silent (``worker_lost``); returns their ids."""
    with session_scope(session_factory) as session:
        reaped = rows.reap_stale(session, timedelta(seconds=heartbeat_timeout_s))
    for audit_id in reaped:
        log.warning("audit %s failed with %s: no heartbeat for %s s", audit_id, WORKER_LOST, heartbeat_timeout_s)
    return reaped


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
    ):
        self.audit_id = audit_id
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

    def run(self, *, final_attempt: bool = True) -> None:
        with self._infra_guard(final_attempt):
            spec = self._start()
            if spec is None:
                return
            work_dir = work_dir_for(self.settings, self.audit_id)
            result = self._run_pipeline(spec, work_dir)
            status = self._publish(result)
            if status is not None:  # None: a newer attempt may be using the same work dir
                self._cleanup(work_dir)
                self._notify(spec, status)

    # -- 1 start ----------------------------------------------------------------------------

    def _start(self) -> AuditSpec | None:
        """Claim the row; None when there is nothing (left) to do."""
        with session_scope(self.sessions) as session:
            try:
                audit = rows.get_audit(session, self.audit_id, for_update=True)
            except rows.AuditNotFound:
                log.info("audit %s was deleted; nothing to do", self.audit_id)
                return None
            if is_terminal(AuditStatus(audit.status)):
                log.info("audit %s is already %s; nothing to do", self.audit_id, audit.status.value)
                pending_webhook = audit.spec.get("callback_url") and delivery_count(session, self.audit_id) == 0
                final = AuditStatus(audit.status)
            else:
                audit = rows.mark_running(session, self.audit_id)
                self.attempt = audit.attempts
                raw_spec, pending_webhook, final = dict(audit.spec), False, None
        if final is not None:
            if pending_webhook:  # the previous attempt died between committing and notifying
                self._notify(parse_spec(audit.spec), final)
            return None
        log.info("audit %s: attempt %d started", self.audit_id, self.attempt)
        try:
            return parse_spec(raw_spec)
        except AuditError as exc:  # the web validated it, but a stored spec can predate a change
            code, message = exc.code, exc.message
        self._finish(lambda s: rows.mark_failed(s, self.audit_id, code, message))
        return None

    # -- 2 inputs and 3 run -----------------------------------------------------------------

    def _download_inputs(self, work_dir: Path) -> tuple[Path | None, Path | None]:
        inputs = work_dir / "inputs"
        paths: list[Path | None] = []
        for name in ("model", "dataset"):
            target = inputs / name
            try:
                self.store.download_to(input_key(self.audit_id, name), target)
                paths.append(target)
            except ArtifactNotFound:
                paths.append(None)
        return paths[0], paths[1]

    def _run_pipeline(self, spec: AuditSpec, work_dir: Path) -> AuditResult:
        model_path, dataset_path = self._download_inputs(work_dir)
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
        link = RowLink(
            self.sessions, self.audit_id, self.attempt,
            planned_stage_weights(spec, dataset_path, self.settings.device),
            interval_s=self.options.progress_interval_s,
        )
        keepalive = min(self.options.keepalive_interval_s, max(1.0, self.settings.heartbeat_timeout_s / 4))
        with KeepAlive(link, keepalive):
            return self.runner(spec, inputs, link.on_progress, link.should_cancel, link.on_metrics)

    # -- 4 publish --------------------------------------------------------------------------

    def _publish(self, result: AuditResult) -> AuditStatus | None:
        """Upload, record and set the final status; None when the row was no longer ours."""
        if result.status == "succeeded":
            infos = self._upload_all(result.artifacts)  # raises: the row stays running
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

    def _cleanup(self, work_dir: Path) -> None:
        """Scratch files go once the audit is final; kept after a crash so a retry can resume."""
        if not self.options.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    # -- failures ---------------------------------------------------------------------------

    @contextmanager
    def _infra_guard(self, final_attempt: bool) -> Iterator[None]:
        """Record, then re-raise: transient errors as ``TransientInfraError``, the rest as internal."""
        try:
            yield
        except SoftTimeLimitExceeded:
            message = f"The audit exceeded its time limit of {self.settings.audit_time_limit_s} s."
            self._record_failure(ErrorCode.TIME_LIMIT.value, message)
            raise
        except Exception as exc:
            transient = transient_error(exc)
            if transient is not None:
                if final_attempt:
                    self._record_failure(transient.code.value, transient.message)
                if transient is exc:
                    raise
                raise transient from exc
            self._record_failure(ErrorCode.INTERNAL_ERROR.value, f"{type(exc).__name__}: {exc}")
            raise

    def _record_failure(self, code: str, message: str) -> None:
        """Best effort: when even this write fails, the reaper fails the row later."""
        try:
            with session_scope(self.sessions) as session:
                audit = rows.get_audit(session, self.audit_id, for_update=True)
                ours = AuditStatus(audit.status) == AuditStatus.RUNNING and audit.attempts == self.attempt
                if ours or AuditStatus(audit.status) == AuditStatus.QUEUED:  # queued: failed before starting
                    rows.mark_failed(session, self.audit_id, code, message)
        except Exception as exc:  # noqa: BLE001 -- the original error is the one to raise
            log.error("audit %s: could not record failure %s (%s)", self.audit_id, code, exc)

    # -- 5 notify ---------------------------------------------------------------------------

    def _notify(self, spec: AuditSpec, status: AuditStatus) -> None:
        """POST the signed completion webhook; never fails the (already final) audit."""
        if spec.callback_url is None:
            return
        url = str(spec.callback_url)
        try:
            with session_scope(self.sessions) as session:
                secret = webhook_secret_for(session, self.audit_id)
                payload = completion_payload(rows.get_audit(session, self.audit_id))
            if secret is None:
                log.warning("audit %s: owner has no live API token to sign the webhook with", self.audit_id)
                return
            deliver(
                url, payload, secret, self.settings.allowed_hosts,
                attempts=self.options.webhook_attempts, backoff=self.options.webhook_backoff_s,
                on_attempt=lambda attempt: self._record_delivery(url, attempt),
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("audit %s: webhook to %s not delivered: %s", self.audit_id, url, exc)

    def _record_delivery(self, url: str, attempt: DeliveryAttempt) -> None:
        with session_scope(self.sessions) as session:
            record_delivery(
                session, self.audit_id, url, attempt.attempt, attempt.status_code, attempt.error, attempt.succeeded
            )


def completion_payload(audit: Any) -> dict[str, Any]:
    """What a webhook receiver gets: enough to act without a second request."""
    error = {"code": audit.error_code, "message": audit.error_message} if audit.error_code else None
    return {
        "event": "audit.finished",
        "audit_id": audit.id,
        "status": AuditStatus(audit.status).value,
        "summary": audit.summary,
        "error": error,
        "finished_at": (audit.finished_at or utcnow()).isoformat(),
        "links": {"self": f"/api/v1/audits/{audit.id}", "report": f"/api/v1/audits/{audit.id}/report.json"},
    }
