"""The Alembic history is linear and builds exactly the schema the models describe."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

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


def test_upgrade_to_0002_gives_existing_audits_the_token_that_signed_their_webhooks(sqlite_url: str) -> None:
    """Audits from before 0002 get their owner's newest live token -- the one the old code signed with."""
    command.upgrade(alembic_config(sqlite_url), "0001")
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (id, email, password_hash, is_admin, created_at) "
                                    "VALUES (1, 'a@example.com', 'x', 0, '2026-11-01 00:00:00')"))
            for token_id, created, revoked in ((1, "01", None), (2, "02", None), (3, "03", "2026-11-04 00:00:00")):
                connection.execute(
                    text("INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, webhook_secret, created_at, "
                         "revoked_at) VALUES (:id, 1, 't', :hash, 'ra_', 's', :created, :revoked)"),
                    {"id": token_id, "hash": f"h{token_id}", "created": f"2026-11-{created} 00:00:00", "revoked": revoked},
                )
            connection.execute(text(
                "INSERT INTO audits (id, owner_id, status, progress, stage_detail, spec, seed, queue, cancel_requested, "
                "attempts, software, created_at, updated_at) VALUES ('a1', 1, 'queued', 0, '{}', '{}', 1, 'cpu', 0, 0, "
                "'{}', '2026-11-05 00:00:00', '2026-11-05 00:00:00')"))
        upgrade_database(sqlite_url)
        with engine.connect() as connection:
            row = connection.execute(text("SELECT token_id, published_at, created_at, recoveries FROM audits")).one()
    finally:
        engine.dispose()
    assert (row.token_id, row.published_at, row.recoveries) == (2, row.created_at, 0)
