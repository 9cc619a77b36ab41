"""Who is signed in: the user id lives in the signed session cookie.

Flask signs the cookie with ``settings.secret_key``, so a browser can read but not
forge it. The user row is re-read on every request, so deleting a user signs them out
everywhere at once. Pages send anonymous visitors to the sign-in page; the portal's
JSON endpoints answer 401 instead, since a redirect means nothing to a script.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import g, redirect, request, session, url_for

from auditor.errors import AuditError, ErrorCode
from auditor.store import users
from auditor.store.models import User
from web.context import db_session
from web.portal.csrf import rotate_csrf_token

View = Callable[..., Any]
USER_KEY = "user_id"


def sign_in(email: str, password: str) -> User | None:
    """Check the password; on success start a fresh session (no fixation) for the user."""
    user = users.authenticate_password(db_session(), email, password)
    if user is None:
        return None
    session.clear()
    session.permanent = True
    session[USER_KEY] = user.id
    rotate_csrf_token()
    return user


def sign_out() -> None:
    session.clear()


def signed_in_user() -> User | None:
    """The session's user, or None (and a cleared session) when the user is gone."""
    user_id = session.get(USER_KEY)
    if user_id is None:
        return None
    user = db_session().get(User, user_id)
    if user is None:
        session.clear()
    return user


def wants_json() -> bool:
    """Requests from the portal's own script ask for JSON; pages are for everything else."""
    return request.accept_mimetypes.best == "application/json" or request.path.endswith(".json")


def login_required(view: View) -> View:
    """Pages: redirect to sign-in and come back. JSON: 401 in the API's envelope."""

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        user = signed_in_user()
        if user is None:
            if wants_json():
                raise AuditError(ErrorCode.UNAUTHORIZED, "Your session has ended; sign in again.")
            return redirect(url_for("portal.signin", next=request.full_path.rstrip("?")))
        g.user = user
        g.user_id = user.id
        return view(*args, **kwargs)

    return guarded


def safe_next(target: str | None) -> str:
    """Only same-site paths after sign-in (``//evil.example``, ``/\\evil.example`` -- which
    browsers read as ``//`` -- and full URLs are ignored)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")) and not urlsplit(target).netloc:
        return target
    return url_for("portal.audits")
