"""The audit status machine: one table of allowed transitions, checked in one place.

The web, the worker and the reaper all change ``audits.status``; routing every change
through ``transition`` means a redelivered task, a late cancel or a reaper racing a
worker can never move a finished audit back to life or skip ``running``.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping, Protocol

from auditor.errors import AuditError, ErrorCode

#: Error code stored on audits whose worker stopped heart-beating and whose restarts are
#: spent (not an ``ErrorCode``: never raised by the pipeline, only written by the sweep).
WORKER_LOST = "worker_lost"


class AuditStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ALLOWED_TRANSITIONS: Mapping[AuditStatus, frozenset[AuditStatus]] = {
    AuditStatus.QUEUED: frozenset({AuditStatus.RUNNING, AuditStatus.CANCELLED, AuditStatus.FAILED}),
    # running -> queued: its worker died and it restarts, or a transient failure is retried.
    AuditStatus.RUNNING: frozenset(
        {AuditStatus.SUCCEEDED, AuditStatus.FAILED, AuditStatus.CANCELLED, AuditStatus.QUEUED}
    ),
    AuditStatus.SUCCEEDED: frozenset(),
    AuditStatus.FAILED: frozenset(),
    AuditStatus.CANCELLED: frozenset(),
}

TERMINAL: frozenset[AuditStatus] = frozenset(s for s, nxt in ALLOWED_TRANSITIONS.items() if not nxt)


class HasStatus(Protocol):
    status: AuditStatus


class IllegalTransition(AuditError):
    """A status change the table forbids, e.g. cancelling an audit that already succeeded."""

    def __init__(self, current: AuditStatus, requested: AuditStatus):
        super().__init__(
            ErrorCode.CONFLICT,
            f"An audit that is {current.value} cannot become {requested.value}.",
            {"status": current.value, "requested": requested.value},
        )
        self.current = current
        self.requested = requested


def can_transition(current: AuditStatus, requested: AuditStatus) -> bool:
    return requested in ALLOWED_TRANSITIONS[current]


def is_terminal(status: AuditStatus) -> bool:
    return status in TERMINAL


def transition(audit: HasStatus, requested: AuditStatus) -> None:
    """Set ``audit.status`` to ``requested`` or raise ``IllegalTransition`` leaving it unchanged."""
    current = AuditStatus(audit.status)
    if not can_transition(current, requested):
        raise IllegalTransition(current, requested)
    audit.status = requested
