"""Process logging: text for people, or one JSON object per line for log shippers, with the audit id.

Operators searching logs for one audit need its id on every line written while it
runs — the pipeline's, the model-API client's, the worker's. ``audit_log_context``
marks the code that runs an audit; an ``AuditIdFilter`` on the handler stamps each
record with ``current_audit_id()``:

* the id set by ``audit_log_context`` in this thread's context, or explicitly cleared
  (the web app clears it for requests that are not about an audit);
* otherwise, when exactly one audit runs in this process — always so in a Celery
  worker process, which runs one audit at a time — that audit's id, so threads the
  audit starts (heartbeats, the API client's pool) are stamped too.

``configure_logging`` installs one handler on the root logger; each process (worker,
gunicorn, ``refine-audit serve``) calls it once with ``Settings.log_format``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
import threading
from typing import Any, Iterator

_UNSET = object()
_context_audit: contextvars.ContextVar[Any] = contextvars.ContextVar("refine_audit_audit_id", default=_UNSET)
_active_lock = threading.Lock()
_active: list[str] = []  # audits running in this process, in start order
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(audit_suffix)s: %(message)s"
#: LogRecord attributes that are not ``extra=`` fields (everything else a caller adds is kept in JSON).
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime",
                                                                                      "audit_id", "audit_suffix"}


@contextlib.contextmanager
def audit_log_context(audit_id: str) -> Iterator[None]:
    """Everything logged inside (and, while it is this process's only audit, in its threads) carries ``audit_id``."""
    token = _context_audit.set(audit_id)
    with _active_lock:
        _active.append(audit_id)
    try:
        yield
    finally:
        with _active_lock:
            _active.remove(audit_id)
        _context_audit.reset(token)


def set_request_audit(audit_id: str | None) -> None:
    """Mark the current thread's work as about ``audit_id`` (None: about no audit), e.g. one web request."""
    _context_audit.set(audit_id)


def current_audit_id() -> str | None:
    value = _context_audit.get()
    if value is not _UNSET:
        return value
    with _active_lock:
        return _active[0] if len(_active) == 1 else None


class AuditIdFilter(logging.Filter):
    """Stamp ``record.audit_id`` (a record that already names one keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "audit_id", None) is None:
            record.audit_id = current_audit_id()
        record.audit_suffix = f" [audit {record.audit_id}]" if record.audit_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, audit_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "audit_id": getattr(record, "audit_id", None),
            "process": record.process,
            "thread": record.threadName,
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: int | str = logging.INFO, stream: Any = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing ``log_format`` to ``stream`` (stderr)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(AuditIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    return handler
