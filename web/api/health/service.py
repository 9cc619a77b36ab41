"""Reachability checks, each bounded by a short timeout and reported separately.

Errors are reported by exception type only: the endpoint needs no token, and driver
messages can carry host names or credentials.
"""

from __future__ import annotations

import logging
import uuid
from typing import Callable

import redis
from sqlalchemy import text

from web.api.health.schemas import ComponentHealth, Health
from web.context import services

log = logging.getLogger(__name__)

BROKER_TIMEOUT_S = 2.0
HEALTH_KEY_PREFIX = "_health/"


def check_all() -> Health:
    components = {
        "database": _guarded("database", _check_database),
        "broker": _guarded("broker", _check_broker),
        "store": _guarded("store", _check_store),
    }
    healthy = all(c.status == "ok" for c in components.values())
    return Health(status="ok" if healthy else "degraded", components=components)


def _guarded(name: str, check: Callable[[], str | None]) -> ComponentHealth:
    try:
        return ComponentHealth(status="ok", detail=check())
    except Exception as exc:
        log.warning("health check of %s failed: %r", name, exc)
        return ComponentHealth(status="error", detail=type(exc).__name__)


def _check_database() -> str | None:
    with services().engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return services().engine.dialect.name


def _check_broker() -> str | None:
    """PING the Redis broker; without one, audits run inside this process."""
    url = services().settings.broker_url
    if url is None:
        return "in-process"
    if url.startswith("memory://"):
        return "memory"
    client = redis.Redis.from_url(url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()
    return "redis"


def _check_store() -> str | None:
    """Write, read back and delete a tiny object under a key unique to this probe, so
    concurrent probes from several web processes cannot disturb each other."""
    store = services().store
    key = f"{HEALTH_KEY_PREFIX}{uuid.uuid4().hex}"
    payload = b"ok"
    store.put(key, payload, "text/plain")
    try:
        if store.get_bytes(key) != payload:
            raise OSError("the store returned different bytes")
    finally:
        store.delete_prefix(key)
    return type(store).__name__
