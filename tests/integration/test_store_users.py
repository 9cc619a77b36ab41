"""Passwords and API tokens: stored only as hashes, revocable, scoped to their user."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from auditor.store import users
from auditor.store.models import ApiToken


def test_token_plaintext_is_not_stored_and_authenticates(pg_session: Session) -> None:
    user = users.create_user(pg_session, "Alice@Example.com", "correct horse")
    token, plaintext = users.create_token(pg_session, user.id, "ci")

    pg_session.expire_all()  # read the row back, not the object we created
    stored = pg_session.get(ApiToken, token.id)  # other tests share the database: never assume it is empty
    assert plaintext not in (stored.token_hash, stored.prefix) and stored.token_hash == users.hash_token(plaintext)
    assert plaintext.startswith(stored.prefix)

    authenticated = users.authenticate_token(pg_session, plaintext)
    assert authenticated is not None and authenticated.user.email == "alice@example.com"
    assert authenticated.last_used_at is not None


def test_unknown_and_revoked_tokens_are_refused(pg_session: Session) -> None:
    user = users.create_user(pg_session, "bob@example.com", "pw")
    token, plaintext = users.create_token(pg_session, user.id, "laptop")
    assert users.authenticate_token(pg_session, plaintext + "x") is None

    assert users.revoke_token(pg_session, token.id, user.id)
    assert users.authenticate_token(pg_session, plaintext) is None


def test_a_user_cannot_revoke_someone_elses_token(pg_session: Session) -> None:
    owner = users.create_user(pg_session, "owner@example.com", "pw")
    other = users.create_user(pg_session, "other@example.com", "pw")
    token, plaintext = users.create_token(pg_session, owner.id, "ci")
    assert not users.revoke_token(pg_session, token.id, other.id)
    assert users.authenticate_token(pg_session, plaintext) is not None


def test_passwords_are_salted_scrypt_and_verified(pg_session: Session) -> None:
    user = users.create_user(pg_session, "carol@example.com", "s3cret")
    assert user.password_hash.startswith("scrypt$") and "s3cret" not in user.password_hash
    assert users.hash_password("s3cret") != users.hash_password("s3cret")
    assert users.authenticate_password(pg_session, "CAROL@example.com", "s3cret") is user
    assert users.authenticate_password(pg_session, "carol@example.com", "wrong") is None
    assert users.authenticate_password(pg_session, "nobody@example.com", "s3cret") is None


def test_emails_are_unique_case_insensitively(pg_session: Session) -> None:
    users.create_user(pg_session, "dave@example.com", "pw")
    with pytest.raises(users.EmailTaken):
        users.create_user(pg_session, "Dave@Example.com", "pw")
