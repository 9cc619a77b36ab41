"""Faults against the real servers: what dies must never lose or strand an audit.

Each test gets a deployment of its own -- a fresh PostgreSQL database, its own
``redis-server`` on a free port (never the machine's), a bucket on SeaweedFS, a
loopback webhook receiver -- and starts real worker processes the way the README does
(no scheduler process: every worker runs the sweep). Then it breaks something:

* SIGKILL the worker mid-audit: the audit restarts on another worker (its own data
  dir, as on another machine) from the REFINE checkpoint mirrored to S3, and succeeds;
* SIGKILL Redis (it keeps nothing on disk) and restart it with audits queued and
  running: every audit ends, the lost messages re-published from the database;
* S3 refusing every artifact write: the audit never says ``succeeded``;
* ``pg_terminate_backend`` on every connection to the test database mid-audit: the
  audit carries on (or ends with a clear code).

After each fault: no audit of the database is ``queued`` or ``running``, and every
audit delivered exactly one webhook, signed with its token's secret, telling its
final status. Timings are shortened through settings (heartbeat timeout 6 s, sweep
every second); the audits are tiny real ones.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from e2e.processes import (
    ServiceProcess,
    deployment_env,
    free_port,
    start_celery_worker,
    start_redis_server,
    wait_for,
)
from shared_fixtures import service_missing, throwaway_database
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from worker_support import MINI_SPEC, Owner, Receiver, load, new_owner, receiver, submit, tiny_checkpoint  # noqa: F401

from auditor import webhooks
from auditor.store import audits
from auditor.store.artifacts import S3Credentials, S3Store
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.lifecycle import AuditStatus, is_terminal
from auditor.store.models import Audit
from web.jobs import CeleryQueue
from auditor.store.artifacts import checkpoint_prefix
from auditor.store.artifacts import artifact_key

pytestmark = pytest.mark.integration

STARTUP_S = 120  # importing torch on two busy shared cores is slow
AUDIT_S = 240
HEARTBEAT_TIMEOUT_S = 6


def audit_spec(epochs: int) -> dict[str, Any]:
    """A tiny real audit whose REFINE stage lasts ``epochs`` checkpointed epochs (~1 s each here)."""
    return {**MINI_SPEC, "data": {"train_size": 1000, "test_size": 100}, "refine": {"epochs": epochs}}


@dataclass
class Deployment:
    """One isolated service: database, Redis, bucket, receiver, and the workers a test starts."""

    tmp_path: Path
    database_url: str
    engine: Engine
    store: S3Store
    receiver: Receiver
    redis_port: int
    base_env: dict[str, str]
    owner: Owner
    redis: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)

    @property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        self.redis = start_redis_server(self.redis_port, self.tmp_path / "redis", self.tmp_path / "redis.log")
        wait_for(lambda: "Ready to accept connections" in self.redis.log_path.read_text(errors="replace"), 30,
                 message="redis-server to be ready", process=self.redis)

    def start_worker(self, name: str, **env: str) -> ServiceProcess:
        """A worker as on a machine of its own: its own data dir (scratch space, checkpoints)."""
        worker_env = {**self.base_env, "REFINE_AUDIT_DATA_DIR": str(self.tmp_path / f"machine-{name}"), **env}
        process = start_celery_worker(worker_env, self.tmp_path / f"worker-{name}.log", hostname=f"{name}@%h")
        self.workers.append(process)
        return process

    def wait_ready(self, *workers: ServiceProcess) -> None:
        for worker in workers:
            wait_for(lambda: "ready." in worker.log_path.read_text(errors="replace"), STARTUP_S,
                     message=f"{worker.log_path.name} to be ready", process=worker)

    def submit(self, spec: dict[str, Any]) -> str:
        """As the web app does: commit the row, upload the model, publish the message."""
        audit_id = submit(self.sessions, self.store, self.owner, {**spec, "callback_url": self.receiver.url},
                          tiny_checkpoint(self.tmp_path / "model.safetensors"))
        CeleryQueue(self.broker_url).enqueue(audit_id, "cpu")
        return audit_id

    def audit(self, audit_id: str) -> Audit:
        return load(self.sessions, audit_id)

    def wait_ended(self, audit_ids: list[str], timeout: float = AUDIT_S) -> dict[str, Audit]:
        def ended() -> dict[str, Audit] | None:
            found = {i: self.audit(i) for i in audit_ids}
            return found if all(is_terminal(AuditStatus(a.status)) for a in found.values()) else None

        try:
            return wait_for(ended, timeout, interval=0.5, message=f"audits {audit_ids} to end")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name} ---\n{w.log_tail(40)}" for w in self.workers)

    def assert_settled(self, audit_ids: list[str]) -> None:
        """Nothing stuck, and each audit announced its final status once, verifiably signed."""
        with session_scope(self.sessions) as session:
            stuck = session.scalars(select(Audit.id).where(Audit.status.in_([AuditStatus.QUEUED, AuditStatus.RUNNING])))
            assert list(stuck) == [], self.logs()
        wait_for(lambda: len(self.receiver.requests) >= len(audit_ids), 30, message="every webhook")
        time.sleep(1.5)  # a second delivery, if there were one, would show up within a sweep interval
        per_audit = Counter(request.json()["audit_id"] for request in self.receiver.requests)
        assert per_audit == {audit_id: 1 for audit_id in audit_ids}, per_audit
        for request in self.receiver.requests:
            assert webhooks.verify(request.body, self.owner.webhook_secret,
                                   request.headers[webhooks.TIMESTAMP_HEADER], request.headers[webhooks.SIGNATURE_HEADER])
            assert request.json()["status"] == AuditStatus(self.audit(request.json()["audit_id"]).status).value


@pytest.fixture
def deployment(
    tmp_path: Path, pg_url: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials, receiver: Receiver,
) -> Iterator[Deployment]:
    with throwaway_database("refine_audit_faults_", service_missing, server_url=pg_url) as database_url:
        upgrade_database(database_url)
        engine = make_engine(database_url)
        redis_port = free_port()
        env = deployment_env(
            database_url=database_url, broker_url=f"redis://127.0.0.1:{redis_port}/0", bucket=s3_store.bucket,
            s3_endpoint=s3_endpoint, access_key=s3_credentials.access_key_id,
            secret_key=s3_credentials.secret_access_key,
            REFINE_AUDIT_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
            REFINE_AUDIT_SWEEP_INTERVAL_S="1",
            REFINE_AUDIT_REPUBLISH_AFTER_S="3",
        )
        found = Deployment(tmp_path, database_url, engine, s3_store, receiver, redis_port, env,
                           new_owner(make_session_factory(engine)))
        try:
            found.start_redis()
            yield found
        finally:
            for process in [*found.workers, *([found.redis] if found.redis else [])]:
                process.kill()  # nothing of theirs outlives the test
            engine.dispose()


def running_worker(deployment: Deployment, audit_id: str, candidates: list[ServiceProcess]) -> ServiceProcess:
    """The worker whose log says it started the audit."""
    def owner() -> ServiceProcess | None:
        return next((w for w in candidates if f"audit {audit_id}: attempt 1 started" in w.log_path.read_text()), None)

    return wait_for(owner, AUDIT_S, message="a worker to start the audit")


# --- the faults ---------------------------------------------------------------------------------


def test_worker_killed_mid_audit_restarts_elsewhere_from_its_checkpoint_and_succeeds(deployment: Deployment) -> None:
    workers = [deployment.start_worker("a"), deployment.start_worker("b")]
    deployment.wait_ready(*workers)
    audit_id = deployment.submit(audit_spec(epochs=8))
    doomed = running_worker(deployment, audit_id, workers)
    wait_for(lambda: deployment.store.list(checkpoint_prefix(audit_id)), AUDIT_S, interval=0.2,
             message="the first REFINE checkpoint in S3", process=doomed)

    doomed.kill()  # SIGKILL to the worker and its pool: no ack, no cleanup, no goodbye
    killed_at = time.monotonic()
    audit = deployment.wait_ended([audit_id])[audit_id]

    assert (audit.status, audit.attempts, audit.recoveries) == (AuditStatus.SUCCEEDED, 2, 1), deployment.logs()
    log = deployment.store.get_bytes(artifact_key(audit_id, "audit.log")).decode()
    assert "refine epoch 8:" in log and "refine epoch 1:" not in log  # resumed, did not start over
    assert deployment.store.list(checkpoint_prefix(audit_id)) == []
    deployment.assert_settled([audit_id])
    print(f"succeeded {time.monotonic() - killed_at:.1f} s after the kill")


def test_redis_restart_with_audits_queued_and_running_loses_none(deployment: Deployment) -> None:
    worker = deployment.start_worker("a")
    deployment.wait_ready(worker)
    audit_ids = [deployment.submit(audit_spec(epochs=6)) for _ in range(2)]  # one runs, one waits in the queue
    wait_for(lambda: deployment.audit(audit_ids[0]).stage == "refine", AUDIT_S, message="the first audit to train",
             process=worker)

    deployment.redis.kill()  # every queued message is gone with it
    time.sleep(2)
    deployment.start_redis()
    ended = deployment.wait_ended(audit_ids)

    assert {a.status for a in ended.values()} == {AuditStatus.SUCCEEDED}, deployment.logs()
    deployment.assert_settled(audit_ids)


class S3Gate:
    """A loopback proxy in front of SeaweedFS that refuses artifact uploads with 503.

    Requests pass through unchanged (the Host header too, so S3 signatures still verify);
    a PUT of any key outside ``inputs/`` and ``checkpoints/`` is answered with S3's own
    ``ServiceUnavailable`` error instead.
    """

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.refused: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuses(self, method: str, path: str) -> bool:
        return method == "PUT" and "/inputs/" not in path and "/checkpoints/" not in path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if gate.refuses(self.command, self.path):
                    gate.refused.append(self.path)
                    error = b"<Error><Code>ServiceUnavailable</Code><Message>refused by the test</Message></Error>"
                    self._answer(503, [("Content-Type", "application/xml")], error)
                    return
                upstream = HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        upstream.putheader(name, value)
                    upstream.endheaders(body or None)
                    response = upstream.getresponse()
                    payload = response.read()
                    headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
                    self._answer(response.status, headers, payload, head=self.command == "HEAD")
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes, head: bool = False) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() != "content-length":
                        self.send_header(name, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(payload)))
                self.send_header("Content-Length", length if head else str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def s3_gate(s3_endpoint: str) -> Iterator[S3Gate]:
    gate = S3Gate(s3_endpoint)
    yield gate
    gate.close()


def test_s3_refusing_artifact_writes_never_yields_succeeded(deployment: Deployment, s3_gate: S3Gate) -> None:
    worker = deployment.start_worker("a", S3_ENDPOINT_URL=s3_gate.url, REFINE_AUDIT_TASK_MAX_RETRIES="0")
    deployment.wait_ready(worker)
    audit_id = deployment.submit(audit_spec(epochs=2))

    audit = deployment.wait_ended([audit_id])[audit_id]

    assert (audit.status, audit.error_code) == (AuditStatus.FAILED, "storage_unavailable"), deployment.logs()
    assert s3_gate.refused, "the gate never refused an upload"
    assert not deployment.store.exists(artifact_key(audit_id, "report.json"))
    with session_scope(deployment.sessions) as session:
        assert audits.list_artifacts(session, audit_id) == []  # nothing recorded that is not there
    deployment.assert_settled([audit_id])


def terminate_database_connections(engine: Engine) -> int:
    """``pg_terminate_backend`` on every other connection to this test's own database."""
    with engine.connect() as connection:
        killed = connection.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )).scalar_one()
        connection.commit()
    return int(killed)


def test_worker_database_connections_terminated_mid_audit(deployment: Deployment) -> None:
    worker = deployment.start_worker("a")
    deployment.wait_ready(worker)
    audit_id = deployment.submit(audit_spec(epochs=8))
    wait_for(lambda: deployment.audit(audit_id).stage == "refine", AUDIT_S, message="the audit to train",
             process=worker)

    killed = terminate_database_connections(deployment.engine)
    time.sleep(2)
    killed += terminate_database_connections(deployment.engine)
    audit = deployment.wait_ended([audit_id])[audit_id]

    assert killed >= 2  # at least the worker's pool and its sweep lock
    assert audit.status == AuditStatus.SUCCEEDED or audit.error_code == "database_unavailable", deployment.logs()
    deployment.assert_settled([audit_id])
