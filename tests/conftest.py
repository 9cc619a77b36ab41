"""Shared fixtures: throwaway databases and an S3 bucket on the services of
``scripts/services.sh start``.

A missing service skips the tests that need it on a developer machine, but fails them
under CI (``CI=true``), where a skipped integration suite would hide a broken setup.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# Tests run tiny tensors, where a second OpenMP thread costs more than it gives, and they
# start worker processes beside pytest: two multi-threaded torch processes on two cores make
# every small op wait a scheduler tick (measured: 13 ms per ReLU). One thread each avoids it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLI keeps its positive-control cache in the user's data folder; tests that exercise the cache
# opt in with a folder of their own, the rest train their controls as they always did.
os.environ.setdefault("REFINE_AUDIT_CONTROL_CACHE", "off")

import pytest
import requests
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from auditor.store.artifacts import S3Credentials, S3Store
from shared_fixtures import service_missing, throwaway_database

torch.set_num_threads(1)
from auditor.store.db import make_engine, upgrade_database

S3_ENDPOINT = os.environ.get("REFINE_AUDIT_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
# The credentials scripts/services.sh configures on its SeaweedFS.
S3_CREDENTIALS = S3Credentials(
    os.environ.get("REFINE_AUDIT_TEST_S3_ACCESS_KEY", "refine-audit-test"),
    os.environ.get("REFINE_AUDIT_TEST_S3_SECRET_KEY", "refine-audit-test-secret"),
)


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the session."""
    with throwaway_database("refine_audit_test_", service_missing) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'refine-audit.db'}"


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on the session's PostgreSQL database, migrated to the newest schema."""
    upgrade_database(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def rolled_back_session(engine: Engine) -> Iterator[Session]:
    """A session whose work, commits included, is undone afterwards (per-test isolation
    without recreating the schema: commits become savepoints of an outer transaction)."""
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An engine on a migrated SQLite file shared by the session (the embedded default)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'refine-audit.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_session(pg_engine: Engine) -> Iterator[Session]:
    yield from rolled_back_session(pg_engine)


ENGINE_FIXTURES = {"postgresql": "pg_engine", "sqlite": "sqlite_engine"}


@pytest.fixture(params=sorted(ENGINE_FIXTURES))
def db_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A rolled-back session, once per supported engine."""
    engine = request.getfixturevalue(ENGINE_FIXTURES[request.param])
    yield from rolled_back_session(engine)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    try:
        requests.get(S3_ENDPOINT, timeout=3)
    except requests.RequestException as error:
        service_missing(f"no S3 endpoint at {S3_ENDPOINT}: {error}")
    return S3_ENDPOINT


@pytest.fixture(scope="session")
def s3_credentials() -> S3Credentials:
    return S3_CREDENTIALS


@pytest.fixture
def s3_store(s3_endpoint: str, s3_credentials: S3Credentials) -> Iterator[S3Store]:
    """An ``S3Store`` on a new bucket, emptied and removed afterwards."""
    store = S3Store(unique_name("refine-audit-test-"), endpoint_url=s3_endpoint, credentials=s3_credentials)
    yield store
    for key in store.list():
        store.client.delete_object(Bucket=store.bucket, Key=key)
    store.client.delete_bucket(Bucket=store.bucket)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than split over two contended ones, and leave a core to the rest."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
