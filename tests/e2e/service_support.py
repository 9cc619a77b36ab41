"""The running service for end-to-end tests: gunicorn (``web.wsgi:app``) and a Celery worker
(``refine-audit worker``) on a PostgreSQL database, a Redis database and an S3 bucket of their
own, plus the client helpers the tests share.

A missing service skips the tests on a developer machine and fails them under ``CI=true``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from shared_fixtures import claimed_redis_db, service_missing, throwaway_database, train_tiny_fmnist_model

from auditor.store.artifacts import S3Credentials, S3Store
from e2e.processes import (
    BIN,
    ServiceProcess,
    api_healthy,
    deployment_env,
    free_port,
    start_gunicorn,
    start_process,
    wait_for,
)

SPEC: dict[str, Any] = {"effort": "tiny", "data": {"train_size": 600, "test_size": 200}, "controls": {"attacks": ["badnets"]}}
QUERY_BUDGET = 3000
EMAIL = "e2e@example.com"
PASSWORD = "e2e-password-123"
STARTUP_S = 120  # importing torch on two busy shared cores is slow
AUDITS_S = 360  # both audits, one after the other on a single worker slot
CLI_S = 120
REDIS_URL = os.environ.get("REFINE_AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379")  # server only; the db is claimed
TERMINAL = ("succeeded", "failed", "cancelled")


# --- the services' resources: a database, a Redis database, a bucket -------------------------


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test only, dropped afterwards even if a process still holds it."""
    with throwaway_database("refine_audit_e2e_", service_missing) as url:
        yield url


@pytest.fixture
def broker_url() -> Iterator[str]:
    with claimed_redis_db(REDIS_URL, service_missing) as url:
        yield url


# --- the model under audit -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    return train_tiny_fmnist_model(tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("model"))


# --- the processes ---------------------------------------------------------------------------




def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, as ``pid name``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name_end = stat.rindex(")")
        fields = stat[name_end + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(f"{entry.name} {stat[stat.index('(') + 1:name_end]}")
    return members


def terminate(process: ServiceProcess) -> list[str]:
    """Stop a process and its whole group; return what outlived even SIGKILL (nothing, normally).

    Children still exiting after the leader are given a grace period, then SIGKILL; only a
    process that survives that is a leak. Judging at the end of the grace period instead
    raced with a busy machine, where a pool child can take longer than any fixed wait to exit.
    """
    process.stop()
    if _wait_for_empty_group(process.pid, grace_s=10):
        return []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return []
    _wait_for_empty_group(process.pid, grace_s=30)
    return group_members(process.pid)


def _wait_for_empty_group(pgid: int, grace_s: float) -> bool:
    deadline = time.monotonic() + grace_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    web: ServiceProcess
    worker: ServiceProcess
    token: str
    bucket: str
    database_url: str

    def api(self, path: str) -> str:
        return f"{self.base_url}/api/v1{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def logs(self) -> str:
        return f"--- gunicorn ---\n{self.web.log_tail()}\n--- worker ---\n{self.worker.log_tail()}"


def cli(env: dict[str, str], *args: str) -> str:
    """Run ``refine-audit ARGS`` as an operator would; return its stdout."""
    done = subprocess.run([str(BIN / "refine-audit"), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=CLI_S)
    assert done.returncode == 0, f"refine-audit {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def service_extra_env() -> dict[str, str]:
    """Override in a test module to run the service with more settings (e.g. JSON logs)."""
    return {}


@pytest.fixture
def service(
    tmp_path: Path, database_url: str, broker_url: str, s3_store: S3Store, s3_endpoint: str,
    s3_credentials: S3Credentials, service_extra_env: dict[str, str],
) -> Iterator[Service]:
    env = deployment_env(
        database_url=database_url, broker_url=broker_url, bucket=s3_store.bucket, s3_endpoint=s3_endpoint,
        access_key=s3_credentials.access_key_id, secret_key=s3_credentials.secret_access_key,
        REFINE_AUDIT_ENV="production", REFINE_AUDIT_SECRET_KEY=uuid.uuid4().hex + uuid.uuid4().hex,
        REFINE_AUDIT_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", **service_extra_env,
    )
    # The operator's steps: migrate once, then an account and a token for the client.
    cli(env, "db", "upgrade")
    cli(env, "user", "create", "--email", EMAIL, "--password", PASSWORD)
    token = cli(env, "token", "create", "--email", EMAIL, "--name", "e2e").strip()
    assert token.startswith("ra_") and "\n" not in token, token

    port = free_port()
    started: list[ServiceProcess] = []
    try:
        worker = start_process(
            "refine-audit-worker", [str(BIN / "refine-audit"), "worker", "--queues", "cpu,gpu", "--concurrency", "1"],
            env, tmp_path / "worker.log",
        )
        started.append(worker)
        web = start_gunicorn("web.wsgi:app", env, tmp_path / "gunicorn.log", bind=f"127.0.0.1:{port}")
        started.append(web)
        base_url = f"http://127.0.0.1:{port}"

        wait_for(lambda: api_healthy(base_url), STARTUP_S, interval=0.5, message="gunicorn to answer /api/v1/health",
                 process=web)
        wait_for(lambda: "ready." in worker.log_path.read_text(errors="replace"), STARTUP_S, interval=0.5,
                 message="the Celery worker to be ready", process=worker)
        yield Service(base_url, env, web, worker, token, s3_store.bucket, database_url)
    finally:
        lingering = {process.name: terminate(process) for process in started}
        assert not any(lingering.values()), f"processes outlived their SIGTERM/SIGKILL: {lingering}"


# --- client helpers ---------------------------------------------------------------------------


def submitted(response: requests.Response) -> str:
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued", body
    return str(body["id"])


def wait_until_ended(service: Service, audit_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll ``GET /audits/{id}`` until every audit has ended; fail at once on a failed one."""
    ended: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(audit_ids):
        for audit_id in audit_ids:
            if audit_id in ended:
                continue
            response = requests.get(service.api(f"/audits/{audit_id}"), headers=service.headers, timeout=30)
            assert response.status_code == 200, response.text
            audit = response.json()
            if audit["status"] in TERMINAL:
                assert audit["status"] == "succeeded", (
                    f"audit {audit_id} ended {audit['status']}: {audit.get('error')}\n{service.logs()}"
                )
                ended[audit_id] = audit
        if not service.worker.alive() or not service.web.alive():
            pytest.fail(f"a service process exited while audits were running:\n{service.logs()}")
        if len(ended) < len(audit_ids) and time.monotonic() > deadline:
            states = {i: requests.get(service.api(f"/audits/{i}"), headers=service.headers, timeout=30).json()
                      for i in audit_ids if i not in ended}
            pytest.fail(f"audits not ended after {timeout:.0f} s: "
                        f"{ {i: (a['status'], a.get('stage'), a.get('progress')) for i, a in states.items()} }\n{service.logs()}")
        time.sleep(2)
    return ended


def download(service: Service, path: str) -> bytes:
    response = requests.get(service.api(path), headers=service.headers, timeout=60)
    assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:500]}"
    return response.content
