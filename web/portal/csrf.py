"""CSRF protection for the portal: one random token per session, checked on every POST.

The session cookie is sent by the browser on any request to our origin, so a state
change must also prove it came from one of our pages. Each session holds a random
token; our pages put it in a hidden ``csrf_token`` field and our script sends it as the
``X-CSRF-Token`` header. Another site can make the browser send the cookie, but cannot
read our pages, so it cannot know the token. Checked with a constant-time compare.
"""

from __future__ import annotations

import hmac
import secrets

from flask import abort, request, session

SESSION_KEY = "csrf_token"
FORM_FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token() -> str:
    """The session's token, made on first use (templates call this for hidden fields)."""
    token = session.get(SESSION_KEY)
    if not token:
        token = session[SESSION_KEY] = secrets.token_urlsafe(32)
    return token


def rotate_csrf_token() -> str:
    """A fresh token, e.g. at sign-in, so a token seen before sign-in is worthless after."""
    session.pop(SESSION_KEY, None)
    return csrf_token()


def check_csrf() -> None:
    """``before_request`` hook: refuse (400) any unsafe request without the session's token."""
    if request.method in SAFE_METHODS:
        return
    expected = session.get(SESSION_KEY)
    sent = request.headers.get(HEADER) or request.form.get(FORM_FIELD)
    if not expected or not sent or not hmac.compare_digest(str(expected), str(sent)):
        abort(400, description="The form has expired or did not come from this site. Reload the page and try again.")
