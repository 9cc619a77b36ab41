"""The Celery application: Redis broker, two queues, settings for hours-long tasks.

``celery -A worker.celery_app worker`` imports this module, which builds ``app`` from
``Settings.from_env()`` once. The configuration follows from one fact: an audit is a
single task that may run for hours on the only GPU of its machine.

* ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged
  only when the audit ends, so a worker that dies mid-audit leaves it to be redelivered.
* ``worker_prefetch_multiplier=1``: a busy worker does not hoard queued audits that an
  idle worker could run.
* Redis ``visibility_timeout`` longer than the hard time limit: Redis redelivers an
  unacknowledged message after this long, so a shorter value would start a second copy
  of a healthy long audit. It is also how a killed worker's audit comes back, so tests
  shorten it with ``REFINE_AUDIT_VISIBILITY_TIMEOUT_S``.
* The reaper (``worker.reap_stale``) runs on a beat schedule and at worker start, and
  fails audits whose heartbeat stopped, so nothing stays ``running`` forever.

Worker-only knobs not in ``Settings`` are read here (``WorkerOptions.from_env``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from celery import Celery
from celery.signals import setup_logging
from kombu import Exchange, Queue

from auditor.logs import configure_logging
from auditor.settings import Settings, SettingsError

QUEUES = ("gpu", "cpu")
DEFAULT_QUEUE = "cpu"
RUN_AUDIT_TASK = "worker.run_audit"
REAP_TASK = "worker.reap_stale"
HARD_LIMIT_GRACE_S = 120  # soft limit -> hard kill: time to record ``time_limit`` and upload nothing more
VISIBILITY_MARGIN_S = 600  # beyond the hard limit, so a healthy audit is never redelivered


@dataclass(frozen=True)
class WorkerOptions:
    """Celery-side limits derived from ``Settings`` plus a few worker-only variables."""

    soft_time_limit_s: int
    time_limit_s: int
    visibility_timeout_s: int
    reap_interval_s: float
    max_retries: int  # task-level retries of transient infrastructure errors
    retry_backoff_s: int  # first retry delay; doubles, capped at retry_backoff_max_s
    retry_backoff_max_s: int
    result_backend: str | None

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] = os.environ) -> WorkerOptions:
        soft = settings.audit_time_limit_s
        hard = soft + HARD_LIMIT_GRACE_S
        return cls(
            soft_time_limit_s=soft,
            time_limit_s=hard,
            visibility_timeout_s=_int(env, "REFINE_AUDIT_VISIBILITY_TIMEOUT_S", hard + VISIBILITY_MARGIN_S),
            reap_interval_s=float(_int(env, "REFINE_AUDIT_REAP_INTERVAL_S", 30)),
            max_retries=_int(env, "REFINE_AUDIT_TASK_MAX_RETRIES", 3, minimum=0),
            retry_backoff_s=_int(env, "REFINE_AUDIT_TASK_RETRY_BACKOFF_S", 10),
            retry_backoff_max_s=_int(env, "REFINE_AUDIT_TASK_RETRY_BACKOFF_MAX_S", 120),
            result_backend=(env.get("REFINE_AUDIT_RESULT_BACKEND") or "").strip() or None,
        )


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(name, f"must be at least {minimum}, not {value}")
    return value


def create_app(settings: Settings, options: WorkerOptions) -> Celery:
    """A Celery app for ``settings``; a worker without a broker is a configuration error."""
    if not settings.broker_url:
        raise SettingsError("REFINE_AUDIT_BROKER_URL", "is required to run a worker (e.g. redis://127.0.0.1:6379/0)")
    app = Celery("refine-audit", broker=settings.broker_url, backend=options.result_backend, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=options.result_backend is None,  # the DB row is the truth, not Celery's result
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": options.visibility_timeout_s},
        # Keep running on a broker blip: a restored duplicate bumps ``attempts`` and the
        # older copy stops itself at its next heartbeat (worker.progress.RowLink).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        # Each queue on its own direct exchange, as ``send_task(..., queue=name)`` from the
        # web app declares it; a bare Queue(name) would bind to the default queue's exchange.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=DEFAULT_QUEUE,
        task_default_exchange=DEFAULT_QUEUE,
        task_default_routing_key=DEFAULT_QUEUE,
        task_routes={REAP_TASK: {"queue": DEFAULT_QUEUE}},
        beat_schedule={
            "reap-stale-audits": {
                "task": REAP_TASK,
                "schedule": options.reap_interval_s,
                # A sweep that waited behind a long audit is pointless; the next one will come.
                "options": {"queue": DEFAULT_QUEUE, "expires": options.reap_interval_s},
            }
        },
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Our handler instead of Celery's: REFINE_AUDIT_LOG_FORMAT, with the audit id on every line."""
    configure_logging(SETTINGS.log_format, loglevel or "INFO")


SETTINGS = Settings.from_env()
OPTIONS = WorkerOptions.from_env(SETTINGS)
app = create_app(SETTINGS, OPTIONS)
