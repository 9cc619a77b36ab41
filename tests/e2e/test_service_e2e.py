"""The whole service, end to end, as a deployment runs it.

Real processes on the real services of ``scripts/services.sh start``: the web app under
gunicorn (``web.wsgi:app``) and a Celery worker (``refine-audit worker``), both on a
PostgreSQL database, a Redis database and an S3 bucket of their own. The test is only a
client: it creates a user and a token with the ``refine-audit`` CLI, submits a checkpoint
audit and a black-box API audit over HTTP, waits for both to succeed, downloads the
report and the defended model through the API, and then looks behind the API: the
artifacts in the bucket (boto3) and the rows in PostgreSQL (psycopg).

A missing service skips the test on a developer machine and fails it under ``CI=true``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import requests
import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import make_url, text

from shared_fixtures import claimed_redis_db, service_missing, train_tiny_fmnist_model

from auditor.blackbox import ModelServer
from auditor.store.artifacts import S3Credentials, S3Store
from auditor.store.db import make_engine
from e2e.processes import BIN, ServiceProcess, service_env, start_gunicorn, start_process, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

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
def database_url(pg_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test only (``pg_url`` fails or skips
    when PostgreSQL is down), dropped afterwards even if a process still holds it."""
    admin = make_engine(pg_url, isolation_level="AUTOCOMMIT")
    name = f"refine_audit_e2e_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def broker_url() -> Iterator[str]:
    with claimed_redis_db(REDIS_URL, service_missing) as url:
        yield url


# --- the model under audit -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    return train_tiny_fmnist_model(tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("model"))


# --- the processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
def service(
    tmp_path: Path, database_url: str, broker_url: str, s3_store: S3Store, s3_endpoint: str,
    s3_credentials: S3Credentials,
) -> Iterator[Service]:
    env = service_env({
        "REFINE_AUDIT_ENV": "production",
        "REFINE_AUDIT_SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
        "REFINE_AUDIT_DATA_DIR": str(tmp_path / "data"),
        "REFINE_AUDIT_DATABASE_URL": database_url,
        "REFINE_AUDIT_BROKER_URL": broker_url,
        "REFINE_AUDIT_ARTIFACTS": f"s3://{s3_store.bucket}",
        "S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": s3_credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3_credentials.secret_access_key,
        "REFINE_AUDIT_DEVICE": "cpu",
        "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    })
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

        def healthy() -> bool:
            try:
                return requests.get(f"{base_url}/api/v1/health", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, STARTUP_S, interval=0.5, message="gunicorn to answer /api/v1/health", process=web)
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


# --- the test ---------------------------------------------------------------------------------


def test_checkpoint_and_api_audits_through_gunicorn_celery_postgresql_redis_and_s3(
    service: Service, fmnist_model: tuple[torch.nn.Module, Path], s3_endpoint: str, s3_credentials: S3Credentials,
) -> None:
    model, checkpoint = fmnist_model
    started = time.monotonic()
    with ModelServer(model, protocol="v1", labels_only=True) as server:
        checkpoint_id = submitted(requests.post(
            service.api("/audits"), headers=service.headers, timeout=60,
            files={"model": ("model.safetensors", checkpoint.read_bytes(), "application/octet-stream")},
            data={"spec": json.dumps(SPEC)},
        ))
        api_spec = {
            **SPEC,
            "model": {"source": "api", "api": {
                "url": f"{server.url}/v1/models/model:predict", "protocol": "v1", "output": "labels",
                "query_budget": QUERY_BUDGET,
            }},
        }
        api_id = submitted(requests.post(service.api("/audits"), headers=service.headers, json=api_spec, timeout=60))

        ended = wait_until_ended(service, [checkpoint_id, api_id], AUDITS_S)
        served = server.stats()["queries"]
    print(f"both audits succeeded after {time.monotonic() - started:.1f} s")

    # The black-box audit stayed within its budget, and counted exactly what the API answered.
    queries_used = ended[api_id]["summary"]["queries_used"]
    assert 0 < queries_used <= QUERY_BUDGET
    assert queries_used == served, (queries_used, served)
    assert "queries_used" not in ended[checkpoint_id]["summary"]

    # Reports and defended models come back through the API ...
    downloads: dict[tuple[str, str], bytes] = {}
    for audit_id, model_file in ((checkpoint_id, "defended_model.pt"), (api_id, "transform.safetensors")):
        pdf = download(service, f"/audits/{audit_id}/report.pdf")
        assert pdf.startswith(b"%PDF"), pdf[:20]
        downloads[audit_id, "report.pdf"] = pdf
        downloads[audit_id, model_file] = download(service, f"/audits/{audit_id}/artifacts/{model_file}")
        listed = requests.get(service.api(f"/audits/{audit_id}/artifacts"), headers=service.headers, timeout=30).json()
        assert {"report.pdf", "report.json", model_file} <= {a["name"] for a in listed["items"]}
    defended = torch.jit.load(io.BytesIO(downloads[checkpoint_id, "defended_model.pt"]), map_location="cpu")
    with torch.no_grad():
        assert defended(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert load_safetensors(downloads[api_id, "transform.safetensors"])  # a non-empty tensor dict

    # ... and are the very objects in the bucket, under audits/{id}/.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=s3_credentials.access_key_id,
                      aws_secret_access_key=s3_credentials.secret_access_key, region_name="us-east-1")
    for (audit_id, name), content in downloads.items():
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=service.bucket, Prefix=f"audits/{audit_id}/").get("Contents", [])}
        assert f"audits/{audit_id}/{name}" in keys, sorted(keys)
        assert s3.get_object(Bucket=service.bucket, Key=f"audits/{audit_id}/{name}")["Body"].read() == content
    assert s3.head_object(Bucket=service.bucket, Key=f"audits/{checkpoint_id}/inputs/model")["ContentLength"] == (
        checkpoint.stat().st_size
    )

    # The rows the web app and the worker wrote, read straight from PostgreSQL.
    url = make_url(service.database_url)
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    with psycopg.connect(conninfo + (f" password={url.password}" if url.password else "")) as connection:
        rows = connection.execute(
            "SELECT a.id, a.status, a.progress, a.summary, u.email FROM audits a JOIN users u ON u.id = a.owner_id"
            " WHERE a.id = ANY(%s)", [[checkpoint_id, api_id]],
        ).fetchall()
        stored = {row[0]: row for row in rows}
        assert set(stored) == {checkpoint_id, api_id}
        for audit_id, status, progress, summary, email in rows:
            assert (status, progress, email) == ("succeeded", 1.0, EMAIL), stored[audit_id]
            assert summary == ended[audit_id]["summary"]
        artifact_names = {name for (name,) in connection.execute(
            "SELECT name FROM artifacts WHERE audit_id = %s", [api_id]).fetchall()}
        assert {"report.pdf", "transform.safetensors"} <= artifact_names
