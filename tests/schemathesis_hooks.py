"""Schemathesis hooks for runs against this API (``schemathesis.toml`` loads them).

A run authenticates with one bearer token and fuzzes ``DELETE /tokens/{token_id}``
among the rest; a generated id that happens to be its own token's would revoke it, and
every later case would then be a meaningless 401. So a revocation only ever targets a
token this run created itself (``POST /tokens``, recorded here); any other id is moved
to a range where no token exists, which still exercises the "no such token" answer.
"""

from __future__ import annotations

import threading

import schemathesis

REVOKE = "DELETE /tokens/{token_id}"
CREATE = "POST /tokens"
#: Ids from here on are never assigned during a run (the id column is a 32-bit integer).
NO_SUCH_TOKEN = 2**30

_created: set[int] = set()
_lock = threading.Lock()


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    if case.operation.label == CREATE and response.status_code == 201:
        with _lock:
            _created.add(response.json()["id"])


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict) -> None:
    if case.operation.label != REVOKE or not case.path_parameters:
        return
    raw = str(case.path_parameters.get("token_id"))  # generated as an int, or as text by the coverage phase
    if not raw.isdecimal() or int(raw) >= NO_SUCH_TOKEN:
        return
    with _lock:
        foreign = int(raw) not in _created
    if foreign:
        case.path_parameters["token_id"] = int(raw) + NO_SUCH_TOKEN
