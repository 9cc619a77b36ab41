"""Submission load on the REST API: does every accepted audit reach the database and the queue exactly once?

    .venv/bin/python -m bench.api_load [--submissions 200] [--polls 2000] [--workers 2]

Starts gunicorn (``web.wsgi:app``) on loopback against a fresh PostgreSQL database, a
Redis database of its own as the broker (no worker consumes it, so every message stays
countable in the ``cpu`` list) and a local artifact folder. Then it fires
``--submissions`` concurrent ``POST /api/v1/audits`` (JSON specs for a model API, each
with its own Idempotency-Key) released together by a barrier, followed by ``--polls``
status reads spread over the accepted audits, and counts:

* accepted -- 202 answers; in_db -- audit rows of the bench user; enqueued -- messages
  in the broker's queue list (decoded to their audit ids);
* lost -- accepted ids missing from the database or from the queue;
* duplicated -- ids enqueued more than once, plus rows beyond the accepted answers.

Writes ``bench/results/api_load.json``. Needs ``scripts/services.sh start``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import func, select

from auditor.store import users
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.models import Audit
from bench.common import RESULTS, git_commit, write_json
from worker.broker import audit_id_of

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.processes import api_healthy, free_port, service_env, start_gunicorn, wait_for  # noqa: E402
from shared_fixtures import throwaway_database  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_DBS = range(5, 16)
LOCK_KEY = "refine-audit:test-lock"  # the same claim the worker tests use
QUEUE = "cpu"
SPEC = {
    "effort": "tiny",
    "model": {"source": "api", "api": {"url": "http://127.0.0.1:9/v1/models/m:predict"}},
}


def claim_redis_db() -> tuple[redis.Redis, int]:
    token = uuid.uuid4().hex
    for db in REDIS_DBS:
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if client.set(LOCK_KEY, token, nx=True, ex=3600):
            client.flushdb()
            client.set(LOCK_KEY, token, ex=3600)
            return client, db
        client.close()
    raise SystemExit(f"every Redis database in {list(REDIS_DBS)} is claimed")


def bench_token(database_url: str) -> tuple[str, int]:
    engine = make_engine(database_url)
    with session_scope(make_session_factory(engine)) as session:
        user = users.create_user(session, "bench@example.com", "bench-password-123")
        _, plaintext = users.create_token(session, user.id, "bench")
        owner_id = user.id
    engine.dispose()
    return plaintext, owner_id


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def submit_all(base: str, token: str, count: int) -> list[dict[str, Any]]:
    """``count`` POSTs released at the same instant; one thread and connection each."""
    barrier = threading.Barrier(count)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def one(i: int) -> dict[str, Any]:
        body = json.dumps(SPEC)
        barrier.wait()
        started = time.perf_counter()
        try:
            response = requests.post(f"{base}/api/v1/audits", data=body, timeout=120,
                                      headers={**headers, "Idempotency-Key": f"bench-{i}"})
            status, payload = response.status_code, response.json() if response.content else {}
        except requests.RequestException as exc:
            status, payload = None, {"error": str(exc)}
        return {"status": status, "id": payload.get("id"), "ms": 1000 * (time.perf_counter() - started), "body": payload}

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def poll_all(base: str, token: str, ids: list[str], count: int, concurrency: int = 32) -> list[dict[str, Any]]:
    local = threading.local()

    def one(i: int) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        try:
            status = local.session.get(f"{base}/api/v1/audits/{ids[i % len(ids)]}", timeout=60).status_code
        except requests.RequestException:
            status = None
        return {"status": status, "ms": 1000 * (time.perf_counter() - started)}

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(count)))


def queued_ids(client: redis.Redis) -> list[str]:
    """The audit id of every ``worker.run_audit`` message waiting in the queue list."""
    return [audit_id for audit_id in map(audit_id_of, client.lrange(QUEUE, 0, -1)) if audit_id is not None]


def run(submissions: int, polls: int, workers: int, threads: int) -> dict[str, Any]:
    with throwaway_database("refine_audit_bench_") as database_url:
        upgrade_database(database_url)
        return run_on(database_url, submissions, polls, workers, threads)


def run_on(database_url: str, submissions: int, polls: int, workers: int, threads: int) -> dict[str, Any]:
    client, redis_db = claim_redis_db()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="refine-audit-bench-"))
    env = service_env({
        "REFINE_AUDIT_ENV": "test",
        "REFINE_AUDIT_DATA_DIR": str(tmp / "data"),
        "REFINE_AUDIT_DATABASE_URL": database_url,
        "REFINE_AUDIT_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "REFINE_AUDIT_ARTIFACTS": f"file://{tmp / 'artifacts'}",
        "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
        "REFINE_AUDIT_SECRET_KEY": uuid.uuid4().hex * 2,
    })
    server = start_gunicorn("web.wsgi:app", env, tmp / "gunicorn.log", bind=f"127.0.0.1:{port}",
                            workers=workers, threads=threads)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: api_healthy(base), 120, message="gunicorn to answer /api/v1/health", process=server)
        token, owner_id = bench_token(database_url)
        started = time.perf_counter()
        posted = submit_all(base, token, submissions)
        submit_s = time.perf_counter() - started
        accepted_ids = [r["id"] for r in posted if r["status"] == 202 and r["id"]]
        started = time.perf_counter()
        polled = poll_all(base, token, accepted_ids or ["missing"], polls)
        poll_s = time.perf_counter() - started
        return summarize(posted, polled, accepted_ids, owner_id, database_url, client, submit_s, poll_s, workers, threads)
    finally:
        server.stop()
        client.flushdb()
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(posted: list[dict[str, Any]], polled: list[dict[str, Any]], accepted_ids: list[str], owner_id: int,
              database_url: str, client: redis.Redis, submit_s: float, poll_s: float, workers: int,
              threads: int) -> dict[str, Any]:
    engine = make_engine(database_url)
    with session_scope(make_session_factory(engine)) as session:
        in_db_ids = set(session.scalars(select(Audit.id).where(Audit.owner_id == owner_id)))
        in_db = session.scalar(select(func.count()).select_from(Audit).where(Audit.owner_id == owner_id)) or 0
    engine.dispose()
    queued = queued_ids(client)
    queue_counts = Counter(queued)
    accepted = set(accepted_ids)
    lost = len([i for i in accepted if i not in in_db_ids or i not in queue_counts])
    duplicated = sum(n - 1 for n in queue_counts.values() if n > 1) + max(0, in_db - len(accepted))
    submit_ms = [r["ms"] for r in posted]
    poll_ms = [r["ms"] for r in polled]
    statuses = Counter(str(r["status"]) for r in posted)
    return {
        "submissions": len(posted),
        "accepted": len(accepted_ids),
        "in_db": in_db,
        "enqueued": len(queued),
        "lost": lost,
        "duplicated": duplicated,
        "polls": len(polled),
        "polls_ok": sum(1 for r in polled if r["status"] == 200),
        "submit_statuses": dict(statuses),
        "submit_p50_ms": round(percentile(submit_ms, 50), 1),
        "submit_p99_ms": round(percentile(submit_ms, 99), 1),
        "poll_p50_ms": round(percentile(poll_ms, 50), 1),
        "poll_p99_ms": round(percentile(poll_ms, 99), 1),
        "submit_seconds": round(submit_s, 2),
        "poll_seconds": round(poll_s, 2),
        "throughput_rps": round((len(posted) + len(polled)) / (submit_s + poll_s), 1),
        "workers": workers,
        "threads_per_worker": threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews latencies
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.api_load", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=200)
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker (gthread)")
    parser.add_argument("--out", type=Path, default=RESULTS / "api_load.json")
    args = parser.parse_args()
    result = run(args.submissions, args.polls, args.workers, args.threads)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if result["lost"] or result["duplicated"] or result["accepted"] != result["submissions"]:
        raise SystemExit("lost, duplicated or refused submissions: see the result")


if __name__ == "__main__":
    main()
