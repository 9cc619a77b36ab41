"""Bearer-token authentication for the API (``Authorization: Bearer ra_...``).

Tokens are looked up by their SHA-256 (``auditor.store.users``); the authenticated user
id and token id go on ``g`` for the request (an audit records the token that submitted
it: that token's secret signs its webhook). Every failure is the same 401, so a caller cannot
tell a revoked token from a made-up one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flask import g, request

from auditor.errors import AuditError, ErrorCode
from auditor.store import users
from web.context import db_session

View = Callable[..., Any]


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def authenticate() -> tuple[int, int]:
    """The user id and token id behind the request's bearer token, or ``unauthorized``.

    ``authenticate_token`` stamps ``last_used_at``; committing it here keeps that write
    out of the views' own units of work.
    """
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise AuditError(ErrorCode.UNAUTHORIZED, "Send an API token as 'Authorization: Bearer <token>'.")
    session = db_session()
    found = users.authenticate_token(session, token)
    if found is None:
        raise AuditError(ErrorCode.UNAUTHORIZED, "The API token is invalid or revoked.")
    user_id, token_id = found.user_id, found.id
    session.commit()
    return user_id, token_id


def require_token(view: View) -> View:
    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        g.user_id, g.token_id = authenticate()
        return view(*args, **kwargs)

    return guarded


def current_user_id() -> int:
    return g.user_id


def current_token_id() -> int:
    return g.token_id
