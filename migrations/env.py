"""Alembic environment shared by PostgreSQL and SQLite.

The URL comes from ``upgrade_database(url)`` (``config.attributes["url"]``), else from
``alembic -x url=...``, else from the settings (``REFINE_AUDIT_DATABASE_URL`` or the
embedded SQLite default). ``render_as_batch`` lets the same migrations alter tables on
SQLite, which has no ALTER COLUMN. On PostgreSQL an advisory lock serialises upgrades,
because the web and the worker both upgrade at start-up and may start together.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from auditor.settings import Settings
from auditor.store.db import make_engine
from auditor.store.models import Base

#: Arbitrary constant naming the PostgreSQL advisory lock held while migrating.
MIGRATION_LOCK_ID = 7_424_151_042


def database_url() -> str:
    config = context.config
    return (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or Settings.from_env().database_url
    )


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``) for a DBA to review."""
    configure(url=database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            migrate(connection)
    finally:
        engine.dispose()


def migrate(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
