"""Users, passwords and API tokens, with only the standard library's hashing.

Passwords use scrypt (memory-hard, in ``hashlib``) with a per-password salt and the
parameters stored in the hash, so they can be raised later without breaking old hashes.
API tokens are long random strings, so a plain SHA-256 is enough and allows a unique
index lookup; the plaintext is returned once by ``create_token`` and never stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.store.models import ApiToken, User, utcnow

TOKEN_PREFIX = "ra_"
DISPLAY_PREFIX_LENGTH = 10
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class EmailTaken(ValueError):
    def __init__(self, email: str):
        super().__init__(f"A user with email {email!r} already exists.")


# --- passwords --------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$digest`` (base64), self-describing for later upgrades."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    return hmac.compare_digest(candidate, base64.b64decode(digest))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# --- users ------------------------------------------------------------------------------


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_user(session: Session, email: str, password: str, *, is_admin: bool = False) -> User:
    email = normalize_email(email)
    if get_user_by_email(session, email) is not None:
        raise EmailTaken(email)
    user = User(email=email, password_hash=hash_password(password), is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def get_user_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(User.email == normalize_email(email))).one_or_none()


def authenticate_password(session: Session, email: str, password: str) -> User | None:
    """The user when the password matches; None for an unknown email or a wrong password."""
    user = get_user_by_email(session, email)
    if user is None or not verify_password(password, user.password_hash):
        return None
    return user


# --- API tokens -------------------------------------------------------------------------


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_token(session: Session, user_id: int, name: str) -> tuple[ApiToken, str]:
    """A new token and its plaintext, which is shown to the user this once only."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user_id=user_id,
        name=name,
        token_hash=hash_token(plaintext),
        prefix=plaintext[:DISPLAY_PREFIX_LENGTH],
        webhook_secret=secrets.token_hex(32),
    )
    session.add(token)
    session.flush()
    return token, plaintext


def authenticate_token(session: Session, plaintext: str) -> ApiToken | None:
    """The live token for a bearer string (``token.user`` is its owner), else None.

    Looks up by hash (indexed) and compares the hashes in constant time; revoked
    tokens never authenticate. Updates ``last_used_at`` for the token list.
    """
    digest = hash_token(plaintext)
    token = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).one_or_none()
    if token is None or token.revoked_at is not None or not hmac.compare_digest(token.token_hash, digest):
        return None
    token.last_used_at = utcnow()
    return token


def list_tokens(session: Session, user_id: int) -> list[ApiToken]:
    query = select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at.desc())
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: int, user_id: int) -> bool:
    """Revoke one of the user's tokens; False when it is not theirs or does not exist."""
    token = session.scalars(
        select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user_id)
    ).one_or_none()
    if token is None:
        return False
    token.revoked_at = token.revoked_at or utcnow()
    return True
