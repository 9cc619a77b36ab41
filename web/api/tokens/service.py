"""Token operations scoped to the calling user."""

from __future__ import annotations

from auditor.store import users
from auditor.store.models import ApiToken
from web.context import db_session
from web.errors import not_found


def create(user_id: int, name: str) -> tuple[ApiToken, str]:
    session = db_session()
    token, plaintext = users.create_token(session, user_id, name)
    session.commit()
    return token, plaintext


def list_own(user_id: int) -> list[ApiToken]:
    return users.list_tokens(db_session(), user_id)


def revoke(user_id: int, token_id: int) -> None:
    """Revoking another user's token looks exactly like revoking a missing one (404)."""
    session = db_session()
    if not users.revoke_token(session, token_id, user_id):
        raise not_found("token")
    session.commit()
