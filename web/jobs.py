"""The job queue port: how the web app hands an audit to whoever runs it.

The web app only ever says "run audit X on queue Q" (after committing the row, so a
worker never sees a missing row). In service mode that is a Celery message sent *by
task name*, so ``web/`` never imports ``worker/`` and the two deploy separately; in the
embedded mode (``refine-audit serve`` without a broker) a background thread in the web
process runs the audits one at a time, because one machine's cores are shared by all
of them and two trainings at once would just both be slow.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
from typing import Callable, Protocol

from celery import Celery

log = logging.getLogger(__name__)

#: The Celery task name the worker registers (``worker/`` owns the task itself).
RUN_AUDIT_TASK = "worker.run_audit"
QUEUES = ("cpu", "gpu")
#: Seconds to wait for the broker when publishing; a dead Redis fails the request fast.
BROKER_CONNECT_TIMEOUT_S = 5


class JobQueue(Protocol):
    def enqueue(self, audit_id: str, queue: str) -> None:
        """Schedule ``audit_id`` to run; must not block on the audit itself."""
        ...


class CeleryQueue:
    """Publishes ``worker.run_audit(audit_id)`` to a Celery broker (Redis)."""

    def __init__(self, broker_url: str):
        self.broker_url = broker_url
        self.app = Celery("refine-audit-web", broker=broker_url, set_as_current=False)
        self.app.conf.update(
            broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
            broker_connection_retry_on_startup=False,
            task_serializer="json",
            accept_content=["json"],
        )

    def enqueue(self, audit_id: str, queue: str) -> None:
        self.app.send_task(RUN_AUDIT_TASK, args=[audit_id], queue=queue)


class InProcessQueue:
    """Runs audits one after another on a single daemon thread of this process.

    For the embedded mode only: the web process must outlive the audits, and an audit
    queued when the process stops is picked up again at the next start (see ``serve``).
    ``run`` records its own failures in the database; this class only logs them, since
    a background thread has no caller to re-raise to.
    """

    _STOP = object()

    def __init__(self, run: Callable[[str], None]):
        self._run = run
        self._pending: stdlib_queue.Queue[object] = stdlib_queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def enqueue(self, audit_id: str, queue: str) -> None:
        self._ensure_thread()
        self._pending.put(audit_id)

    def wait_idle(self) -> None:
        """Block until every audit enqueued so far has run (tests, graceful shutdown)."""
        self._pending.join()

    def close(self) -> None:
        """Finish the queued audits, then stop the thread."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None:
            self._pending.put(self._STOP)
            thread.join()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="refine-audit-runner", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is self._STOP:
                    return
                self._run_one(str(item))
            finally:
                self._pending.task_done()

    def _run_one(self, audit_id: str) -> None:
        try:
            self._run(audit_id)
        except Exception:
            log.exception("audit %s ended with an unexpected error", audit_id)
