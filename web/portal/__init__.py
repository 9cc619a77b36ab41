"""The web portal: the same audits and tokens as the REST API, for people with a browser.

It is a second face of ``web/api``, not a second implementation: every view calls the
API's service functions (``web.api.audits.service``, ``web.api.tokens.service``), so a
submission is validated, stored and queued exactly as ``POST /api/v1/audits`` does it.
What the portal adds is what a browser needs: password sign-in with a signed session
cookie, a CSRF token on every form, server-rendered pages and a small script for live
progress and upload progress.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Flask

from auditor.settings import Settings

#: How long a signed-in browser stays signed in without signing in again.
SESSION_LIFETIME = timedelta(hours=12)


def configure_sessions(app: Flask, settings: Settings) -> None:
    """Cookie flags for the session: never readable by scripts, not sent on cross-site
    POSTs (a second line behind the CSRF token), and HTTPS-only in production (tests
    and the embedded mode run on plain-HTTP loopback)."""
    app.config.update(
        SESSION_COOKIE_NAME="refine_audit_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.is_production,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )


def portal_blueprint() -> Blueprint:
    """A fresh blueprint per app (tests build many apps in one process)."""
    from web.portal.views import register_routes

    bp = Blueprint(
        "portal", __name__, template_folder="templates", static_folder="static", static_url_path="/portal-static"
    )
    register_routes(bp)
    return bp
