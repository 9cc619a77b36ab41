"""The running audit's line to its database row: progress, heartbeats, cancellation.

The pipeline calls ``on_progress`` per batch and ``should_cancel`` between batches --
far too often for a database round trip each -- so both are throttled: progress is
written at most once per ``interval_s`` (and on every stage change, so the stage log is
complete), and the cancel flag is re-read with each heartbeat. Every write uses a fresh
short session; no connection is held while the model trains.

A small keep-alive thread heart-beats even while the pipeline is inside one long step
that reports nothing (rendering a PDF, tracing a model), so only a dead or wedged
process goes silent long enough for the sweep to recover the audit; after each beat
it also runs a chore of the executor's (mirroring new checkpoints to the store).

A database hiccup during a write is logged and skipped: progress is cosmetic, and a
six-hour training run must not die because one UPDATE failed. A write broken by Celery's
soft time limit is not a hiccup: the limit is raised again (``interrupted_by_time_limit``).
A row that is no longer ours -- reaped, cancelled, or restarted by a redelivered task
(``attempts`` moved on) -- makes ``should_cancel`` answer True, so the pipeline stops at
the next batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from auditor.errors import AuditError
from auditor.pipeline import STAGES, plan_audit
from auditor.pipeline.data import data_summary
from auditor.runtime import resolve_device
from auditor.spec import AuditSpec
from auditor.store.audits import get_audit, heartbeat, update_progress
from auditor.store.db import session_scope
from auditor.store.lifecycle import IllegalTransition
from worker.infra import interrupted_by_time_limit

log = logging.getLogger(__name__)

class StageProgress:
    """Maps ``(stage, done, total)`` to overall progress in [0, 1] over the audit's stages.

    ``weights`` are each stage's share of the run time, in run order: the audit plan's
    per-stage estimates (``planned_stage_weights``).
    """

    def __init__(self, weights: Mapping[str, float]):
        total = sum(weights.values()) or 1.0
        self._start: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        acc = 0.0
        for stage, weight in weights.items():
            self._start[stage], self._weight[stage] = acc, weight / total
            acc += weight / total
        self._last = 0.0

    def overall(self, stage: str, done: int, total: int) -> float:
        """Never moves backwards: stages restart their own counters (e.g. per attack)."""
        if stage in self._start:
            fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
            self._last = max(self._last, self._start[stage] + self._weight[stage] * fraction)
        return min(self._last, 1.0)


def planned_stage_weights(spec: AuditSpec, dataset_path: Path | None, device: str) -> dict[str, float]:
    """Each stage's share of the audit's estimated run time, from the same plan ``run_audit`` resolves.

    A spec that cannot be planned fails in the pipeline with its own error code; until
    then its stages simply share the bar equally.
    """
    try:
        return plan_audit(spec, data_summary(spec, dataset_path), device=resolve_device(device)).stage_weights()
    except (AuditError, ValueError):
        return {stage: 1.0 for stage in STAGES if stage != "surrogate" or spec.model.source == "api"}


class RowLink:
    """Throttled, failure-tolerant callbacks that tie a pipeline run to its audit row."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        audit_id: str,
        attempt: int,
        stage_weights: Mapping[str, float],
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._sessions = sessions
        self.audit_id = audit_id
        self._attempt = attempt
        self._progress = StageProgress(stage_weights)
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()  # the keep-alive thread and the pipeline share the state below
        self._stage: str | None = None
        self._last_write = float("-inf")
        self._last_beat = float("-inf")
        self._metrics: dict[str, Any] = {}
        self._parts: dict[str, str] = {}
        self.cancel_requested = False
        self.lost_reason: str | None = None

    # -- the pipeline's callbacks --------------------------------------------------------------

    def on_progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            value = self._progress.overall(stage, done, total)
            now = self._clock()
            changed = stage != self._stage
            if not changed and now - self._last_write < self._interval:
                return
            self._stage, self._last_write = stage, now
            detail = {"stage": stage, "done": done, "total": total, **({"metrics": self._metrics} if self._metrics else {}),
                      **({"parts": self._parts} if self._parts else {})}
        self._write(lambda s: update_progress(s, self.audit_id, stage, value, detail))

    def on_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        """Kept and shown with the next progress write (per-epoch numbers such as the loss)."""
        with self._lock:
            self._metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
            self._last_write = float("-inf")  # show new epoch numbers promptly

    def on_parts(self, parts: dict[str, str]) -> None:
        """Where the audit's positive controls run when they are separate tasks (``worker/parts.py``), e.g.
        ``{"badnets": "running on worker-2"}``; shown with the next progress write."""
        with self._lock:
            if parts != self._parts:
                self._parts = dict(parts)
                self._last_write = float("-inf")

    def should_cancel(self) -> bool:
        if self.lost_reason is None and not self.cancel_requested:
            self.beat(force=False)
        return self.cancel_requested or self.lost_reason is not None

    # -- heartbeats --------------------------------------------------------------------------

    def beat(self, *, force: bool = True) -> None:
        """Refresh ``heartbeat_at`` and pick up the cancel flag (one short transaction)."""
        with self._lock:
            now = self._clock()
            if not force and now - self._last_beat < self._interval:
                return
            self._last_beat = now
        self._write(self._heartbeat)

    def _heartbeat(self, session: Session) -> None:
        cancel = heartbeat(session, self.audit_id)
        attempts = get_audit(session, self.audit_id).attempts
        if attempts != self._attempt:
            self._lose(f"attempt {attempts} of this audit started elsewhere (this is attempt {self._attempt})")
        elif cancel and not self.cancel_requested:
            log.info("audit %s: cancellation requested", self.audit_id)
            self.cancel_requested = True

    def _write(self, work: Callable[[Session], Any]) -> None:
        try:
            with session_scope(self._sessions) as session:
                work(session)
        except IllegalTransition as exc:
            self._lose(exc.message)
        except SQLAlchemyError as exc:
            if interrupted_by_time_limit(exc):
                raise SoftTimeLimitExceeded() from exc
            log.warning("audit %s: progress/heartbeat write skipped: %s", self.audit_id, exc)

    def _lose(self, reason: str) -> None:
        if self.lost_reason is None:
            log.warning("audit %s: no longer ours (%s); stopping", self.audit_id, reason)
            self.lost_reason = reason


class KeepAlive:
    """A daemon thread that calls ``link.beat()`` every ``interval_s`` until stopped.

    ``after_beat`` runs after each beat while the audit is still ours; its failures are
    logged and retried at the next beat, never fatal to the audit.
    """

    def __init__(self, link: RowLink, interval_s: float, after_beat: Callable[[], object] | None = None):
        self._link = link
        self._interval = interval_s
        self._after_beat = after_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-heartbeat", daemon=True)

    def __enter__(self) -> KeepAlive:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._link.beat()
            if self._after_beat is not None and self._link.lost_reason is None:
                try:
                    self._after_beat()
                except Exception as exc:  # noqa: BLE001 -- e.g. S3 briefly down: the next beat retries
                    log.warning("audit %s: keep-alive chore failed: %s", self._link.audit_id, exc)
