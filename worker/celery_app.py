"""The Celery application: Redis broker, two queues, settings for hours-long tasks.

``celery -A worker.celery_app worker`` imports this module, which builds ``app`` from
``Settings.from_env()`` once. The configuration follows from one fact: an audit is a
task that may run for hours on the only GPU of its machine (its positive controls may
run beside it as tasks of their own, ``worker/parts.py``, each just as long).

* ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged
  only when the audit ends, so a pool process that dies mid-audit hands it straight
  back, and the executor restarts the audit from its last checkpoint.
* ``worker_prefetch_multiplier=1``: a busy worker does not hoard queued audits that an
  idle worker could run.
* Redis ``visibility_timeout`` beyond the hard time limit (by default 12 minutes beyond
  ``Settings.hard_time_limit_s``): Redis redelivers an unacknowledged message after this
  long, so a shorter value would send a second copy of a healthy long audit (which the
  executor would drop, but only after watching its heartbeat). A worker machine that
  dies does not wait for it: the sweep (``worker.sweep``), which every worker runs,
  notices the stopped heartbeat.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import setup_logging
from kombu import Exchange, Queue

from auditor.sandbox import audit_runner
from auditor.logs import configure_logging
from auditor.settings import Settings, SettingsError

QUEUES = ("gpu", "cpu")
DEFAULT_QUEUE = "cpu"


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``; a worker without a broker is a configuration error."""
    if not settings.broker_url:
        raise SettingsError("REFINE_AUDIT_BROKER_URL", "is required to run a worker (e.g. redis://127.0.0.1:6379/0)")
    backend = settings.result_backend
    app = Celery("refine-audit", broker=settings.broker_url, backend=backend, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=backend is None,  # the DB row is the truth, not Celery's result
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Keep running on a broker blip: the audit's row, not the message, says who runs it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        # Each queue on its own direct exchange, as ``send_task(..., queue=name)`` from the
        # web app declares it; a bare Queue(name) would bind to the default queue's exchange.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=DEFAULT_QUEUE,
        task_default_exchange=DEFAULT_QUEUE,
        task_default_routing_key=DEFAULT_QUEUE,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Our handler instead of Celery's: REFINE_AUDIT_LOG_FORMAT, with the audit id on every line."""
    configure_logging(SETTINGS.log_format, loglevel or "INFO")


SETTINGS = Settings.from_env()
app = create_app(SETTINGS)
#: Every audit runs in the sandbox; production without one (and without consent) stops here.
RUNNER = audit_runner(SETTINGS, logging.getLogger(__name__).warning)
