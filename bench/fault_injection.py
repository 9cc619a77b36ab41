"""Fault injection: worker SIGKILLs and Redis restarts with audits in flight -- is any audit lost?

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.fault_injection [--kills 10] [--redis-restarts 3]
    .venv/bin/python -m bench.fault_injection --refresh-sections   # only re-read the other sections' files

Runs the service as deployed, on this machine: gunicorn (``web.wsgi:app``) and two
``refine-audit worker`` processes (no scheduler: every worker runs the sweep) on a
fresh PostgreSQL database, a ``redis-server`` of its own on a free port that keeps
nothing on disk, and a bucket on SeaweedFS. A user and a token come from the
``refine-audit`` CLI; tiny Fashion-MNIST audits (spec fields only, 8 REFINE epochs)
are submitted over the REST API with a ``callback_url`` to a loopback receiver.
Timings are shortened through settings: heartbeat timeout 10 s, sweep every 2 s,
re-publication after 5 s.

* **Worker kills** (``--kills``): per trial one audit; when it has run a random 0-12 s
  (seeded), the worker running it is SIGKILLed, process group and all, and a
  replacement with an empty data dir (a new machine) is started.
* **Redis restarts** (``--redis-restarts``): per trial four audits (two running, two
  queued); once one is training, Redis is SIGKILLed -- losing every message -- and
  restarted empty 2 s later.

Counted per audit, ``--timeout`` seconds after the fault: ``succeeded``; ``resumed``:
restarted from a REFINE checkpoint restored from S3 (its ``checkpoint`` event);
``worker_lost``; ``terminal``; ``stuck``: still queued or running; ``lost``: accepted
by the API but missing from the database, or ended without exactly one webhook
(verified against the token's secret) reaching the receiver. ``audits_in_flight``:
queued or running when Redis died.

``hostile_checkpoints`` and ``schemathesis`` come from other runs: the script copies
``bench/results/hostile_checkpoints.json`` and ``bench/results/schemathesis.json`` when
they exist (naming the file in ``source``), else leaves them null. Per-trial details go
to ``bench/results/fault_injection_trials.json``. Needs ``scripts/services.sh start``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import select

from auditor import webhooks
from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.store import audits
from auditor.store.artifacts import S3Credentials, S3Store
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.lifecycle import WORKER_LOST, AuditStatus, is_terminal
from auditor.store.models import Audit
from bench.common import RESULTS, git_commit, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.processes import (  # noqa: E402
    BIN,
    api_healthy,
    ServiceProcess,
    deployment_env,
    free_port,
    start_gunicorn,
    start_process,
    start_redis_server,
    wait_for,
)
from integration.worker_support import Receiver, start_receiver  # noqa: E402
from shared_fixtures import throwaway_database  # noqa: E402

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
S3_ENDPOINT = "http://127.0.0.1:8333"
S3_CREDENTIALS = S3Credentials("refine-audit-test", "refine-audit-test-secret")  # what scripts/services.sh configures
OUT = RESULTS / "fault_injection.json"
TRIALS_OUT = RESULTS / "fault_injection_trials.json"
OTHER_SECTIONS = {
    "hostile_checkpoints": (RESULTS / "hostile_checkpoints.json", ("cases", "refused", "payload_ran")),
    "schemathesis": (RESULTS / "schemathesis.json", ("cases", "server_errors", "schema_mismatches")),
}
SPEC: dict[str, Any] = {
    "effort": "tiny",
    "data": {"train_size": 1000, "test_size": 100},
    "controls": {"attacks": []},
    "probes": {"images": 20},
    "refine": {"epochs": 8},
}
TIMINGS = {"REFINE_AUDIT_HEARTBEAT_TIMEOUT_S": "10", "REFINE_AUDIT_SWEEP_INTERVAL_S": "2",
           "REFINE_AUDIT_REPUBLISH_AFTER_S": "5"}
STARTUP_S = 180
EMAIL = "faults@example.com"


@dataclass
class Service:
    """The deployment under test and the handles the faults need."""

    tmp: Path
    env: dict[str, str]
    base_url: str
    token: str
    webhook_secret: str
    database_url: str
    redis_port: int
    store: S3Store
    receiver: Receiver
    model: Path
    redis: ServiceProcess | None = None
    web: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)
    machines: int = 0

    def start_redis(self) -> None:
        self.redis = start_redis_server(self.redis_port, self.tmp / "redis", self.tmp / f"redis-{time.time_ns()}.log")
        wait_for(lambda: "Ready to accept connections" in self.redis.log_path.read_text(errors="replace"), 30,
                 message="redis-server", process=self.redis)

    def start_worker(self) -> ServiceProcess:
        """A worker on a new "machine": a data dir of its own."""
        self.machines += 1
        name = f"machine-{self.machines}"
        env = {**self.env, "REFINE_AUDIT_DATA_DIR": str(self.tmp / name)}
        argv = [str(BIN / "refine-audit"), "worker", "--queues", "cpu", "--concurrency", "1"]
        worker = start_process(f"worker {name}", argv, env, self.tmp / f"{name}.log")
        self.workers.append(worker)
        wait_for(lambda: "ready." in worker.log_path.read_text(errors="replace"), STARTUP_S,
                 message=f"{name} to be ready", process=worker)
        return worker

    def submit(self) -> str:
        spec = {**SPEC, "callback_url": self.receiver.url}
        with open(self.model, "rb") as model:
            response = requests.post(f"{self.base_url}/api/v1/audits", headers={"Authorization": f"Bearer {self.token}"},
                                     files={"model": ("model.safetensors", model)}, data={"spec": json.dumps(spec)},
                                     timeout=60)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def rows(self, audit_ids: list[str]) -> dict[str, Audit]:
        engine = make_engine(self.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                return {a.id: a for a in session.scalars(select(Audit).where(Audit.id.in_(audit_ids)))}
        finally:
            engine.dispose()

    def restored_checkpoints(self, audit_id: str) -> bool:
        engine = make_engine(self.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                return any(e.kind == "checkpoint" for e in audits.list_events(session, audit_id))
        finally:
            engine.dispose()

    def running_worker(self, audit_id: str, timeout: float) -> ServiceProcess:
        started = f"audit {audit_id}: attempt 1 started"
        return wait_for(lambda: next((w for w in self.workers if w.alive() and started in w.log_path.read_text()), None),
                        timeout, message=f"a worker to start {audit_id}")

    def wait_settled(self, audit_ids: list[str], timeout: float) -> None:
        """Until every audit has ended and announced it, or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows(audit_ids)
            ended = [i for i in audit_ids if i in rows and is_terminal(AuditStatus(rows[i].status))]
            announced = {r.json()["audit_id"] for r in self.receiver.requests}
            if len(ended) == len(audit_ids) and announced >= set(audit_ids):
                time.sleep(3)  # a duplicate webhook, if any, would arrive within a sweep or two
                return
            time.sleep(1)

    def outcome(self, audit_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = self.rows(audit_ids)
        webhooks_per_audit = Counter(r.json()["audit_id"] for r in self.receiver.requests if self._signed(r))
        result = {}
        for audit_id in audit_ids:
            row = rows.get(audit_id)
            status = AuditStatus(row.status).value if row is not None else "missing"
            result[audit_id] = {
                "status": status,
                "error_code": row.error_code if row is not None else None,
                "attempts": row.attempts if row is not None else None,
                "recoveries": row.recoveries if row is not None else None,
                "resumed": self.restored_checkpoints(audit_id) if row is not None else False,
                "webhooks": webhooks_per_audit[audit_id],
            }
        return result

    def _signed(self, request: Any) -> bool:
        return webhooks.verify(request.body, self.webhook_secret, request.headers[webhooks.TIMESTAMP_HEADER],
                               request.headers[webhooks.SIGNATURE_HEADER], tolerance_s=3600)

    def stop(self) -> None:
        for process in [*self.workers, *(p for p in (self.web, self.redis) if p is not None)]:
            process.kill()


def lost(audit: dict[str, Any]) -> bool:
    return audit["status"] == "missing" or (audit["status"] not in ("queued", "running") and audit["webhooks"] != 1)


def stuck(audit: dict[str, Any]) -> bool:
    return audit["status"] in ("queued", "running")


def cli(env: dict[str, str], *args: str) -> str:
    """``refine-audit ARGS`` as an operator runs it; its stdout."""
    done = subprocess.run([str(BIN / "refine-audit"), *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=True)
    return done.stdout


@contextmanager
def service() -> Iterator[Service]:
    tmp = Path(tempfile.mkdtemp(prefix="refine-audit-faults-"))
    store = S3Store(f"refine-audit-faults-{uuid.uuid4().hex[:10]}", endpoint_url=S3_ENDPOINT, credentials=S3_CREDENTIALS)
    receiver, receiver_server = start_receiver()
    found: Service | None = None
    try:
        with throwaway_database("refine_audit_faults_", server_url=PG_SERVER) as database_url:
            upgrade_database(database_url)
            redis_port, web_port = free_port(), free_port()
            env = deployment_env(
                database_url=database_url, broker_url=f"redis://127.0.0.1:{redis_port}/0", bucket=store.bucket,
                s3_endpoint=S3_ENDPOINT, access_key=S3_CREDENTIALS.access_key_id,
                secret_key=S3_CREDENTIALS.secret_access_key, REFINE_AUDIT_SECRET_KEY=uuid.uuid4().hex * 2,
                REFINE_AUDIT_DATA_DIR=str(tmp / "web"), **TIMINGS,
            )
            cli(env, "user", "create", "--email", EMAIL, "--password", "fault-injection")
            minted = json.loads(cli(env, "token", "create", "--email", EMAIL, "--json"))
            arch = ArchConfig("small_cnn", width=4)
            model = save_classifier(build_classifier(arch), arch, tmp / "model.safetensors")
            found = Service(tmp, env, f"http://127.0.0.1:{web_port}", minted["token"], minted["webhook_secret"],
                            database_url, redis_port, store, receiver, model)
            found.start_redis()
            found.web = start_gunicorn("web.wsgi:app", env, tmp / "gunicorn.log", bind=f"127.0.0.1:{web_port}")
            wait_for(lambda: api_healthy(found.base_url), STARTUP_S, message="gunicorn", process=found.web)
            for _ in range(2):
                found.start_worker()
            yield found
    finally:
        if found is not None:
            found.stop()
        receiver_server.shutdown()
        store.delete_prefix("audits/")
        store.client.delete_bucket(Bucket=store.bucket)
        shutil.rmtree(tmp, ignore_errors=True)


def kill_trials(svc: Service, trials: int, timeout: float, rng: random.Random) -> list[dict[str, Any]]:
    results = []
    for trial in range(trials):
        audit_id = svc.submit()
        victim = svc.running_worker(audit_id, timeout)
        delay = rng.uniform(0, 12)
        time.sleep(delay)
        stage = svc.rows([audit_id])[audit_id].stage
        victim.kill()
        svc.workers.remove(victim)
        started = time.monotonic()
        svc.start_worker()  # the replacement machine
        svc.wait_settled([audit_id], timeout)
        outcome = svc.outcome([audit_id])[audit_id]
        results.append({"trial": trial, "audit_id": audit_id, "killed_after_s": round(delay, 1), "stage_at_kill": stage,
                        "seconds_to_settle": round(time.monotonic() - started, 1), **outcome})
        print(json.dumps(results[-1]), flush=True)
    return results


def redis_trials(svc: Service, trials: int, audits_per_trial: int, timeout: float) -> list[dict[str, Any]]:
    results = []
    for trial in range(trials):
        audit_ids = [svc.submit() for _ in range(audits_per_trial)]
        wait_for(lambda: any(r.stage == "refine" for r in svc.rows(audit_ids).values()), timeout,
                 message="an audit to train")
        in_flight = [i for i, r in svc.rows(audit_ids).items() if r.status in (AuditStatus.QUEUED, AuditStatus.RUNNING)]
        svc.redis.kill()
        time.sleep(2)
        svc.start_redis()
        started = time.monotonic()
        svc.wait_settled(audit_ids, timeout)
        outcome = svc.outcome(audit_ids)
        results.append({"trial": trial, "audits": outcome, "in_flight": in_flight,
                        "seconds_to_settle": round(time.monotonic() - started, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def summarize_kills(results: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "trials": len(results),
        "succeeded": sum(r["status"] == "succeeded" for r in results),
        "resumed": sum(bool(r["resumed"]) for r in results),
        "worker_lost": sum(r["error_code"] == WORKER_LOST for r in results),
        "lost": sum(lost(r) for r in results),
        "stuck": sum(stuck(r) for r in results),
    }


def summarize_restarts(results: list[dict[str, Any]]) -> dict[str, int]:
    in_flight = [r["audits"][i] for r in results for i in r["in_flight"]]
    return {
        "trials": len(results),
        "audits_in_flight": len(in_flight),
        "terminal": sum(a["status"] not in ("queued", "running", "missing") for a in in_flight),
        "lost": sum(lost(a) for r in results for a in r["audits"].values()),
        "stuck": sum(stuck(a) for r in results for a in r["audits"].values()),
    }


def other_section(name: str) -> dict[str, Any] | None:
    """A section another run measured, with where it came from; None when that run's file is absent."""
    path, keys = OTHER_SECTIONS[name]
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    section = data.get(name, data) if isinstance(data, dict) else {}
    return {**{key: section.get(key) for key in keys}, "source": str(path.relative_to(REPO))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--redis-restarts", type=int, default=3)
    parser.add_argument("--audits-per-restart", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the audits of one trial to settle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh-sections", action="store_true",
                        help="keep the measured sections of the existing result; re-read the other two")
    args = parser.parse_args()
    sections = {name: other_section(name) for name in OTHER_SECTIONS}
    if args.refresh_sections:
        result = {**json.loads(OUT.read_text()), **sections}
        write_json(OUT, result)
        print(json.dumps(result, indent=2))
        return
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.fault_injection", *sys.argv[1:]])
    started = time.monotonic()
    with service() as svc:
        kills = kill_trials(svc, args.kills, args.timeout, random.Random(args.seed))
        restarts = redis_trials(svc, args.redis_restarts, args.audits_per_restart, args.timeout)
    result = {
        "worker_kills": summarize_kills(kills),
        "redis_restarts": summarize_restarts(restarts),
        **sections,
        "command": command,
        "git_commit": git_commit(),
    }
    write_json(OUT, result)
    write_json(TRIALS_OUT, {"command": command, "git_commit": git_commit(), "settings": TIMINGS, "spec": SPEC,
                            "seconds": round(time.monotonic() - started), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "worker_kills": kills, "redis_restarts": restarts})
    print(json.dumps(result, indent=2))
    if result["worker_kills"]["lost"] or result["redis_restarts"]["lost"] or result["worker_kills"]["stuck"] \
            or result["redis_restarts"]["stuck"]:
        raise SystemExit("audits were lost or stuck: see the result")


if __name__ == "__main__":
    main()
