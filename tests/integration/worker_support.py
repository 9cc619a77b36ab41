"""Helpers shared by the test_worker_* modules: settings on the real services, submitted
audits (committed row + uploaded checkpoint, as the web app leaves them), a tiny model,
and a loopback webhook receiver.

Executor tests commit for real (the executor opens its own sessions, like a worker),
so they isolate by owner: every test creates its own user and audits on the session's
PostgreSQL database, which is dropped at the end of the run. Tests that start real Celery
workers take a database of their own (``workers_database``): a worker's sweep acts on every audit.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared_fixtures import claimed_redis_db, service_missing, throwaway_database

from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.settings import Settings
from auditor.store import audits, users
from auditor.store.artifacts import ArtifactStore, S3Credentials, S3Store, input_key
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.models import Audit, AuditEvent
from worker.executor import ExecutorOptions
from worker.notify import WebhookPolicy

#: The brief's tiny audit: real stages, one positive control.
TINY_SPEC: dict[str, Any] = {"effort": "tiny", "data": {"train_size": 600, "test_size": 200}, "controls": {"attacks": ["badnets"]}}
#: Smaller still, for runs inside a Celery worker on two shared cores (no positive control).
MINI_SPEC: dict[str, Any] = {
    "effort": "tiny",
    "data": {"train_size": 200, "test_size": 100},
    "controls": {"attacks": []},
    "probes": {"images": 20},
}
FAST_OPTIONS = ExecutorOptions(progress_interval_s=0.2, keepalive_interval_s=0.5, upload_attempts=2, upload_backoff_s=0.1,
                               webhook_policy=WebhookPolicy(max_attempts=3, backoff_s=(0.0,)))


def settings_for(tmp_path: Path, database_url: str, store: S3Store, endpoint: str, credentials: S3Credentials,
                 **extra: str) -> Settings:
    env = {
        "REFINE_AUDIT_ENV": "test",
        "REFINE_AUDIT_DATA_DIR": str(tmp_path / "data"),
        "REFINE_AUDIT_DATABASE_URL": database_url,
        "REFINE_AUDIT_ARTIFACTS": f"s3://{store.bucket}",
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
        "REFINE_AUDIT_DEVICE": "cpu",
        "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
        **extra,
    }
    return Settings.from_env(env)


def tiny_checkpoint(path: Path) -> Path:
    arch = ArchConfig("small_cnn", width=4)
    return save_classifier(build_classifier(arch), arch, path)


@dataclass
class Owner:
    """A user and the API token its audits are submitted with."""

    user_id: int
    token_id: int
    webhook_secret: str


def new_owner(sessions: sessionmaker[Session]) -> Owner:
    with session_scope(sessions) as session:
        user = users.create_user(session, f"{uuid.uuid4().hex[:10]}@example.com", "password-123")
        token, _ = users.create_token(session, user.id, "ci")
        return Owner(user.id, token.id, token.webhook_secret)


def submit(sessions: sessionmaker[Session], store: ArtifactStore, owner: Owner, spec: dict[str, Any],
           model: Path | bytes | None) -> str:
    """What the web app does: commit the queued row (with the submitting token), then upload its inputs."""
    with session_scope(sessions) as session:
        audit, _ = audits.create_audit(session, owner_id=owner.user_id, spec=spec, seed=spec.get("seed", 0),
                                       token_id=owner.token_id)
        audit_id = audit.id
    if model is not None:
        store.put(input_key(audit_id, "model"), model)
    return audit_id


def load(sessions: sessionmaker[Session], audit_id: str) -> Audit:
    with session_scope(sessions) as session:
        return audits.get_audit(session, audit_id)


def events(sessions: sessionmaker[Session], audit_id: str) -> list[AuditEvent]:
    with session_scope(sessions) as session:
        return audits.list_events(session, audit_id)


@pytest.fixture
def sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


@pytest.fixture
def workers_database(pg_url: str) -> Iterator[str]:
    """URL of a migrated database of this test's own, for tests that start real Celery workers.

    A worker's sweep requeues and republishes every stranded audit in its database, whoever
    owns it: on the session's shared database it takes up audits that other test files left
    queued or running (it did once the suite ran in two processes and the files' order changed).
    """
    with throwaway_database("refine_audit_workers_", service_missing, server_url=pg_url) as url:
        upgrade_database(url)
        yield url


@pytest.fixture(name="sessions")
def workers_database_sessions(workers_database: str) -> Iterator[sessionmaker[Session]]:
    """``sessions`` on ``workers_database``: import this one instead where real workers run."""
    engine = make_engine(workers_database)
    yield make_session_factory(engine)
    engine.dispose()


# --- a loopback webhook receiver ----------------------------------------------------------


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers with the next status of ``statuses`` (the last one repeats)."""

    url: str
    statuses: list[int]
    requests: list[Received] = field(default_factory=list)
    extra_headers: dict[str, str] = field(default_factory=dict)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.requests.append(Received(body, {k: v for k, v in self.headers.items()}))
            index = min(len(receiver.requests), len(receiver.statuses)) - 1
            self.send_response(receiver.statuses[index])
            for name, value in receiver.extra_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def start_receiver() -> tuple[Receiver, ThreadingHTTPServer]:
    """A webhook receiver on a free loopback port, answering 200 (benchmarks use it too)."""
    box = Receiver(url="", statuses=[200])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(box))
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/audit"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return box, server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box, server = start_receiver()
    yield box
    server.shutdown()
    server.server_close()


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A Redis database no other test holds, for one test's Celery broker."""
    with claimed_redis_db("redis://127.0.0.1:6379", service_missing) as url:
        yield url
