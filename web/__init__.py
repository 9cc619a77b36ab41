"""The refine-audit web app: the REST API and the web portal.

``create_app`` is the one composition point of the web process. The ports (artifact
store, job queue) and the engine can be injected, which is how ``refine-audit serve``
plugs in the in-process runner and how tests plug in a recording queue; otherwise they
are built from the settings. The app keeps no state of its own between requests, so
any number of gunicorn workers on any number of machines can serve it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor.logs import set_request_audit
from auditor.settings import Settings
from auditor.store.artifacts import ArtifactStore, store_from_url
from auditor.store.db import make_engine, make_session_factory
from web.jobs import CeleryQueue, JobQueue

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy import Engine


def create_app(
    settings: Settings,
    *,
    store: ArtifactStore | None = None,
    queue: JobQueue | None = None,
    engine: Engine | None = None,
) -> Flask:
    """Build the app; the schema must already be migrated (``upgrade_database``).

    Flask and the routes are imported here, not at module level, so that importing
    ``web.cli`` (from ``auditor/cli.py``) or ``web.jobs`` (from the worker's tests)
    pulls in neither Flask nor torch.
    """
    from flask import Flask

    from web.api import api_blueprint
    from web.context import Services, install
    from web.errors import register_error_handlers
    from web.inputs import install as install_input_checks
    from web.metrics import install_metrics
    from web.portal import configure_sessions, portal_blueprint

    app = Flask(__name__)
    app.config.update(SECRET_KEY=settings.secret_key, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    install_input_checks(app, settings)
    configure_sessions(app, settings)
    engine = engine or make_engine(settings.database_url)
    install(
        app,
        Services(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=store or store_from_url(settings.artifacts_url, settings),
            queue=queue or default_queue(settings),
        ),
    )
    register_error_handlers(app)
    app.before_request(_log_which_audit)
    app.register_blueprint(api_blueprint())
    app.register_blueprint(portal_blueprint())
    install_metrics(app)
    return app


def _log_which_audit() -> None:
    """Log lines of a request about one audit carry its id; other requests' lines carry none."""
    from flask import request

    set_request_audit((request.view_args or {}).get("audit_id"))


def default_queue(settings: Settings) -> JobQueue:
    """Celery when a broker is configured; without one the caller must inject a queue,
    because only the composition root (``refine-audit serve``) may import the worker."""
    if settings.broker_url is None:
        raise ValueError(
            "No job queue: set REFINE_AUDIT_BROKER_URL (service mode) or run `refine-audit serve` (in-process mode)."
        )
    return CeleryQueue(settings.broker_url)
