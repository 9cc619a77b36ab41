"""What the Redis broker holds right now, read without consuming anything.

The sweep re-publishes a queued audit only when its message is gone -- after a Redis
restart without persistence, or when the worker that had taken it died before
claiming the row -- so an audit waiting in a long queue is never published twice.
kombu's Redis transport keeps a queue as a list named after it (plus one list per
priority step), and the messages workers have taken but not acknowledged in the
``unacked`` hash, with the time they were taken in the ``unacked_index`` sorted set.
The names come from kombu's own channel class, and a test publishes real messages
through Celery and reads them back here, so a change of layout fails a test.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from kombu.transport.redis import Channel

#: The task that runs one audit; its one argument is the audit id.
RUN_AUDIT_TASK = "worker.run_audit"
#: The task that runs one positive control of a split audit (``worker/parts.py``): audit id, control name.
RUN_CONTROL_TASK = "worker.run_control"
SOCKET_TIMEOUT_S = 5.0


def audit_id_of(raw: bytes | str) -> str | None:
    """The audit id a raw ``worker.run_audit`` message carries (None for any other message)."""
    try:
        return _audit_id_in(json.loads(raw))
    except ValueError:
        return None


def _audit_id_in(message: Any) -> str | None:
    try:
        if message.get("headers", {}).get("task") != RUN_AUDIT_TASK:
            return None
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu spreads one queue over, one per priority step."""
    return [queue] + [f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps if step]


@dataclass(frozen=True)
class BrokerHoldings:
    """Audit ids whose message is waiting in a queue, and those taken by a worker (with when)."""

    waiting: frozenset[str]
    taken_at: dict[str, float]  # audit id -> Unix time a worker took its newest message

    def holds(self, audit_id: str, *, taken_since: float | None) -> bool:
        """Whether the broker still has the audit's message in hand.

        ``taken_since=None`` counts only waiting messages (the audit's last holder is
        known to be gone); otherwise a taken message counts when taken after that time.
        """
        if audit_id in self.waiting:
            return True
        taken = self.taken_at.get(audit_id)
        return taken is not None and taken_since is not None and taken >= taken_since


class RedisBroker:
    """Read-only view of a kombu Redis broker."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)

    def holdings(self, queues: Iterable[str]) -> BrokerHoldings:
        waiting: set[str] = set()
        for queue in queues:
            for name in queue_lists(queue):
                waiting.update(filter(None, map(audit_id_of, self.client.lrange(name, 0, -1))))
        return BrokerHoldings(frozenset(waiting), self._taken())

    def _taken(self) -> dict[str, float]:
        taken: dict[str, float] = {}
        times = dict(self.client.zrange(Channel.unacked_index_key, 0, -1, withscores=True))
        for tag, raw in self.client.hgetall(Channel.unacked_key).items():
            try:
                audit_id = _audit_id_in(json.loads(raw)[0])  # the hash holds [message, exchange, routing key]
            except (ValueError, IndexError, TypeError):
                continue
            if audit_id is not None:
                taken[audit_id] = max(taken.get(audit_id, 0.0), float(times.get(tag, time.time())))
        return taken

    def close(self) -> None:
        self.client.close()
