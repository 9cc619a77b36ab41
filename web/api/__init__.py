"""The REST API, ``/api/v1``: one blueprint per resource under one parent blueprint."""

from __future__ import annotations

from flask import Blueprint

from web.api.registry import API_PREFIX


def api_blueprint() -> Blueprint:
    """A fresh parent blueprint (one per app, so tests can build many apps)."""
    from web.api.audits.routes import bp as audits
    from web.api.health.routes import bp as health
    from web.api.openapi import bp as docs
    from web.api.tokens.routes import bp as tokens

    api = Blueprint("api", __name__, url_prefix=API_PREFIX)
    for child in (audits, tokens, health, docs):
        api.register_blueprint(child)
    return api
