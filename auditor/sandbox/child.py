"""The sandboxed side of an audit: ``python -m auditor.sandbox.child --events-fd N``.

Runs inside bubblewrap (``auditor.sandbox.launcher``). Reads the request (spec and
sandbox paths of the inputs) from stdin, runs ``run_audit`` with callbacks that write
JSON lines to the inherited pipe (progress, metrics and the pipeline's log lines), polls the parent's cancel file between batches, and
ends with one ``result`` line: status, report, summary, artifacts (paths inside the
sandbox) and error. An exception the pipeline lets through still ends in a result, so
the parent can tell a failure from a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

PROGRESS_INTERVAL_S = 0.1  # progress lines at most this often within a stage


class EventPipe:
    """JSON lines to the parent; progress throttled, stage changes and completions always sent."""

    def __init__(self, fd: int):
        self.fd = fd
        self._stage: str | None = None
        self._last = 0.0

    def send(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, default=str).encode() + b"\n"
        while data:
            data = data[os.write(self.fd, data):]

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == self._stage and done < total and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._stage, self._last = stage, now
        self.send({"type": "progress", "stage": stage, "done": int(done), "total": int(total)})

    def metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        self.send({"type": "metrics", "stage": stage, "metrics": metrics})


class ForwardedLogs(logging.Handler):
    """Sends the pipeline's log records (INFO and up) to the parent, which logs them as its own
    with the audit id stamped on, so operators find a sandboxed audit's lines in the worker's log."""

    def __init__(self, events: EventPipe):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.send({"type": "log", "level": record.levelno, "logger": record.name,
                              "message": record.getMessage()})
        except Exception:  # noqa: BLE001 -- a log line must never break the audit
            self.handleError(record)


def _error_of(exc: BaseException) -> dict[str, Any]:
    """An unexpected exception as an audit error: memory exhaustion is the sandbox's limit, not our bug."""
    from auditor.errors import ErrorCode

    text = f"{type(exc).__name__}: {exc}"[:2000]
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
        return {"code": ErrorCode.SANDBOX_LIMIT_EXCEEDED.value, "message": f"The audit ran out of memory ({text}).",
                "detail": {}}
    return {"code": ErrorCode.INTERNAL_ERROR.value, "message": text, "detail": {}}


def run(request: dict[str, Any], events: EventPipe) -> dict[str, Any]:
    from auditor.pipeline import AuditInputs, run_audit
    from auditor.spec import parse_spec

    raw = request["inputs"]
    inputs = AuditInputs(
        work_dir=Path(raw["work_dir"]),
        model_path=Path(raw["model_path"]) if raw.get("model_path") else None,
        dataset_path=Path(raw["dataset_path"]) if raw.get("dataset_path") else None,
        allowed_hosts=tuple(raw.get("allowed_hosts") or ()),
        audit_id=raw.get("audit_id") or "local",
        device=raw.get("device") or "auto",
        fmnist_dir=Path(raw["fmnist_dir"]),
        cache_dir=Path(raw["cache_dir"]),
        control_cache=Path(raw["control_cache"]) if raw.get("control_cache") else None,
        only_control=str(raw["only_control"]) if raw.get("only_control") else None,
    )
    cancel_file = Path(request["cancel_file"])
    logging.getLogger("auditor").addHandler(ForwardedLogs(events))
    result = run_audit(parse_spec(request["spec"]), inputs, events.progress, cancel_file.exists, events.metrics)
    return {
        "status": result.status,
        "report": result.report,
        "summary": result.summary,
        "artifacts": [{"name": a.name, "path": str(a.path), "kind": a.kind, "content_type": a.content_type}
                      for a in result.artifacts],
        "error": result.error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    events = EventPipe(args.events_fd)
    try:
        message = run(json.loads(sys.stdin.read()), events)
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which decides
        message = {"status": "failed", "report": None, "summary": {"status": "failed"}, "artifacts": [],
                   "error": _error_of(exc)}
    events.send({"type": "result", **message})
    return 0


if __name__ == "__main__":
    sys.exit(main())
