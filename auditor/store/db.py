"""Engines, sessions and schema upgrades for PostgreSQL and the embedded SQLite file.

Sessions are short (one per request, one per task phase): ``session_scope`` commits on
success and rolls back on error, and ``expire_on_commit=False`` keeps loaded rows
readable after the session closes, so a worker can load its inputs, close the session
and train for hours without holding a connection.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import auditor

SQLITE_BUSY_TIMEOUT_MS = 10_000
MIGRATIONS_DIR = Path(auditor.__file__).resolve().parent.parent / "migrations"


def normalize_url(url: str) -> str:
    """Route plain ``postgresql://`` URLs to psycopg 3, the driver we install."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the per-backend settings the service relies on."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url, **kwargs)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    """WAL keeps commits cheap and never blocked by a reader; foreign keys make CASCADE real.

    ``isolation_level = None`` stops pysqlite from issuing its own BEGINs, so that
    SQLAlchemy's BEGIN (see ``_begin_sqlite_transaction``) and SAVEPOINTs behave as on
    PostgreSQL -- needed by ``create_audit``'s savepoint and by rolled-back test sessions.
    """
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _begin_sqlite_transaction(connection: Any) -> None:
    """Every transaction takes the write lock at BEGIN, waiting up to the busy timeout.

    A deferred BEGIN starts as a reader; in WAL mode its first write fails at once with
    "database is locked" (the busy handler is skipped) when another connection committed
    since its read, e.g. ``refine-audit user create`` reading the users table while an
    in-process audit records its progress. Taking the lock first makes it wait its turn.
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit if the block succeeds, roll back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None) -> Config:
    """Alembic configuration without ``alembic.ini``, so it works from any working directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade_database(url: str) -> None:
    """Bring the schema to the newest migration (run at service start-up; idempotent)."""
    command.upgrade(alembic_config(url), "head")
