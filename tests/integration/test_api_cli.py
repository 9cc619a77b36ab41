"""The operator commands: users, tokens, the in-process server and its start-up requeue."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import requests
from click.testing import CliRunner

from auditor.settings import Settings
from auditor.store import audits
from auditor.store.artifacts import LocalStore
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.models import User
from web import create_app
from web.cli import build_queue, register, requeue_unfinished
from web.jobs import CeleryQueue, InProcessQueue

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path: Path):
    group = click.Group("refine-audit")
    register(group)
    runner = CliRunner(env={"REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_ENV": "test"})
    return lambda *args, **kw: runner.invoke(group, list(args), catch_exceptions=False, **kw)


class ListQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def enqueue(self, audit_id: str, queue: str) -> None:
        self.sent.append((audit_id, queue))


def test_user_and_token_commands_mint_a_working_token_and_revoke_it(cli, tmp_path: Path) -> None:
    created = cli("user", "create", "--email", "Ops@Example.com", input="correct horse\ncorrect horse\n")
    minted = cli("token", "create", "--email", "ops@example.com", "--name", "ci")
    token = minted.stdout.strip()
    app = create_app(Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path)}), queue=ListQueue())
    client = app.test_client()

    assert created.exit_code == 0 and minted.exit_code == 0
    assert token.startswith("ra_") and "\n" not in token
    assert client.get("/api/v1/audits", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    listed = cli("token", "list", "--email", "ops@example.com")
    assert token[:10] in listed.stdout and token not in listed.stdout
    token_id = listed.stdout.splitlines()[1].split()[0]
    assert cli("token", "revoke", "--email", "ops@example.com", token_id).exit_code == 0
    assert client.get("/api/v1/audits", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_cli_refuses_duplicate_users_and_unknown_owners(cli) -> None:
    cli("user", "create", "--email", "a@example.com", "--password", "long enough")

    duplicate = cli("user", "create", "--email", "a@example.com", "--password", "long enough")
    orphan = cli("token", "create", "--email", "nobody@example.com")

    assert duplicate.exit_code == 1 and "already exists" in duplicate.stderr
    assert orphan.exit_code == 1 and "user create" in orphan.stderr


def test_start_up_requeues_audits_a_previous_server_left_unfinished(sqlite_url: str) -> None:
    upgrade_database(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    with session_scope(sessions) as session:
        owner = User(email=f"requeue-{time.time_ns()}@example.com", password_hash="unused")
        session.add(owner)
        session.flush()
        made = [audits.create_audit(session, owner_id=owner.id, spec={}, seed=0)[0].id for _ in range(3)]
        audits.mark_running(session, made[1])
        audits.mark_cancelled(session, made[2])
    queue = ListQueue()

    requeued = requeue_unfinished(sessions, queue)

    assert requeued == made[:2]
    assert queue.sent == [(made[0], "cpu"), (made[1], "cpu")]


def test_serve_uses_celery_with_a_broker_and_runs_in_process_without(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with_broker = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_BROKER_URL": "redis://127.0.0.1:6379/15"})
    embedded = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path)})

    assert isinstance(build_queue(with_broker, store), CeleryQueue)
    assert isinstance(build_queue(embedded, store), InProcessQueue)
    with pytest.raises(ValueError, match="REFINE_AUDIT_BROKER_URL"):
        create_app(embedded)  # gunicorn without a broker: refuse at start, not at the first submission


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_migrates_and_answers_on_the_embedded_defaults(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_ENV": "test"}
    env.pop("REFINE_AUDIT_BROKER_URL", None)
    code = f"import click, web.cli as c; g = click.Group('r'); c.register(g); g(['serve', '--port', '{port}'])"
    server = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}/api/v1/health", server)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert health["status"] == "ok" and health["components"]["broker"]["detail"] == "in-process"
    assert (tmp_path / "refine-audit.db").exists()


def wait_for_health(url: str, server: subprocess.Popen, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve exited early: {server.stderr.read().decode()[-2000:]}")
        try:
            return requests.get(url, timeout=2).json()
        except requests.ConnectionError:
            time.sleep(0.2)
    pytest.fail("serve did not answer in time")


def test_importing_the_cli_commands_loads_neither_flask_nor_torch() -> None:
    """auditor/cli.py registers these commands, and the ML core must not pull in Flask."""
    code = "import sys, web.cli; print(sorted({'flask', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
