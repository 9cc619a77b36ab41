"""The Alembic history is linear and builds exactly the schema the models describe."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from auditor.store.db import alembic_config, make_engine, upgrade_database
from auditor.store.models import Base

TABLES = {"users", "api_tokens", "audits", "audit_events", "artifacts", "webhook_deliveries", "webhook_outbox"}


def schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_migrations_have_a_single_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def test_every_migration_has_a_message() -> None:
    for revision in ScriptDirectory.from_config(alembic_config()).walk_revisions():
        assert revision.doc and revision.doc.strip(), revision.revision


def test_upgrade_head_on_empty_postgresql_matches_the_models(pg_engine: Engine) -> None:
    assert TABLES <= set(inspect(pg_engine).get_table_names())
    assert schema_diff(pg_engine) == []


def test_upgrade_head_on_sqlite_matches_the_models(sqlite_url: str) -> None:
    upgrade_database(sqlite_url)
    upgrade_database(sqlite_url)  # start-up runs it every time: must be a no-op
    engine = make_engine(sqlite_url)
    try:
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_the_schema(sqlite_url: str) -> None:
    upgrade_database(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    engine = make_engine(sqlite_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
