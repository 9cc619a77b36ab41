"""What a request needs from the app: settings, the ports, and its own DB session.

``create_app`` builds one ``Services`` and stores it in ``app.extensions``; views and
services reach it through ``services()``. The database session is per request: made on
first use, closed (rolling back anything uncommitted) at teardown, so a failed request
can never leave half a write behind or leak a connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from auditor.settings import Settings
from auditor.store.artifacts import ArtifactStore
from web.jobs import JobQueue

EXTENSION_KEY = "refine_audit"


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    queue: JobQueue


def services() -> Services:
    return current_app.extensions[EXTENSION_KEY]


def db_session() -> Session:
    """The request's session, created on first use."""
    if "db_session" not in g:
        g.db_session = services().sessions()
    return g.db_session


def install(app: Flask, found: Services) -> None:
    app.extensions[EXTENSION_KEY] = found
    app.teardown_appcontext(_close_session)


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
