"""Fixtures and helpers shared by the REST API tests (imported by each test_api_* module).

The app runs on the real databases of tests/conftest.py (a migrated SQLite file and the
session's PostgreSQL) and a real artifact store; only the job queue is a recording fake,
the adapter at the edge. Requests really commit (the fake queue checks from a separate
connection that the row was committed before it was enqueued), so instead of a
rolled-back transaction each test works under fresh users, and teardown deletes them,
which cascades to their tokens, audits, events and artifact records: the shared
databases are empty again for the store tests that expect it.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete
from werkzeug.test import TestResponse

from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.settings import Settings
from auditor.store import audits, users
from auditor.store.artifacts import ArtifactStore, LocalStore
from auditor.store.db import make_session_factory, session_scope
from auditor.store.models import User
from web import create_app

TINY_SPEC: dict[str, Any] = {"effort": "tiny"}
MAX_UPLOAD_MB = 1
API_URL = "http://127.0.0.1:9/v1/models/m:predict"  # allowlisted loopback; never contacted here


@dataclass
class RecordingQueue:
    """A JobQueue that records what was enqueued, and proves the row was committed first
    by reading it from a separate session at enqueue time."""

    engine: Engine
    sent: list[tuple[str, str]] = field(default_factory=list)

    def enqueue(self, audit_id: str, queue: str) -> None:
        with session_scope(make_session_factory(self.engine)) as session:
            audits.get_audit(session, audit_id)  # AuditNotFound if not committed yet
        self.sent.append((audit_id, queue))

    @property
    def ids(self) -> list[str]:
        return [audit_id for audit_id, _ in self.sent]


@dataclass
class Api:
    app: Flask
    client: FlaskClient
    queue: RecordingQueue
    store: ArtifactStore
    engine: Engine
    settings: Settings
    owners: list[int] = field(default_factory=list)

    def new_user(self) -> tuple[int, str]:
        """A fresh owner and a bearer token for it (no password hashing: tests stay fast)."""
        with session_scope(make_session_factory(self.engine)) as session:
            owner = User(email=f"{uuid.uuid4().hex[:12]}@example.com", password_hash="unused")
            session.add(owner)
            session.flush()
            self.owners.append(owner.id)
            _, plaintext = users.create_token(session, owner.id, "test")
            return owner.id, plaintext

    def delete_owners(self) -> None:
        """Remove everything this test created; the database cascades from users."""
        with session_scope(make_session_factory(self.engine)) as session:
            session.execute(delete(User).where(User.id.in_(self.owners)))

    def token(self) -> str:
        return self.new_user()[1]

    def submit(
        self,
        token: str,
        model: bytes | None,
        spec: dict[str, Any] | str | None = None,
        dataset: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> TestResponse:
        data: dict[str, Any] = {}
        if model is not None:
            data["model"] = (io.BytesIO(model), "model.bin")
        if dataset is not None:
            data["dataset"] = (io.BytesIO(dataset), "data.zip")
        if spec is not None:
            data["spec"] = spec if isinstance(spec, str) else json.dumps(spec)
        return self.client.post(
            "/api/v1/audits", data=data, content_type="multipart/form-data", headers={**auth(token), **(headers or {})}
        )

    def submit_json(self, token: str, spec: dict[str, Any], headers: dict[str, str] | None = None) -> TestResponse:
        return self.client.post("/api/v1/audits", json=spec, headers={**auth(token), **(headers or {})})


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_spec(url: str = API_URL, **extra: Any) -> dict[str, Any]:
    return {"effort": "tiny", "model": {"source": "api", "api": {"url": url, "auth_value": "s3cret", "auth_header": "X-Key"}}, **extra}


def make_settings(tmp_path: Path, engine: Engine, **env: str) -> Settings:
    return Settings.from_env(
        {
            "REFINE_AUDIT_ENV": "test",
            "REFINE_AUDIT_DATA_DIR": str(tmp_path),
            "REFINE_AUDIT_DATABASE_URL": engine.url.render_as_string(hide_password=False),
            "REFINE_AUDIT_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
            "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
            **env,
        }
    )


def build_api(tmp_path: Path, engine: Engine, store: ArtifactStore | None = None, **env: str) -> Api:
    settings = make_settings(tmp_path, engine, **env)
    store = store or LocalStore(tmp_path / "artifacts")
    queue = RecordingQueue(engine)
    app = create_app(settings, store=store, queue=queue, engine=engine)
    return Api(app, app.test_client(), queue, store, engine, settings)


ENGINES = {"sqlite": "sqlite_engine", "postgresql": "pg_engine"}
ApiFactory = Callable[..., Api]


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[ApiFactory]:
    """``api_factory(engine, store=None, **env)``; every app's users are deleted afterwards."""
    built: list[Api] = []

    def build(engine: Engine, store: ArtifactStore | None = None, **env: str) -> Api:
        built.append(build_api(tmp_path, engine, store, **env))
        return built[-1]

    yield build
    for made in built:
        made.delete_owners()


@pytest.fixture(params=sorted(ENGINES))
def api(request: pytest.FixtureRequest, api_factory: ApiFactory) -> Api:
    """The app on each supported database, with a local artifact store."""
    return api_factory(request.getfixturevalue(ENGINES[request.param]))


@pytest.fixture
def sqlite_api(sqlite_engine: Engine, api_factory: ApiFactory) -> Api:
    """The embedded configuration only, for checks that do not depend on the database."""
    return api_factory(sqlite_engine)


def checkpoint_bytes(folder: Path, width: int) -> bytes:
    """A real classifier as self-describing safetensors (architecture in the header); wider is larger."""
    arch = ArchConfig("small_cnn", num_classes=10, width=width)
    path = folder / "model.safetensors"
    save_classifier(build_classifier(arch), arch, path)
    return path.read_bytes()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real, tiny classifier."""
    return checkpoint_bytes(tmp_path_factory.mktemp("checkpoint"), width=4)
