"""One audit on two one-thread workers (split) vs one two-thread worker (unsplit): wall time.

    nice -n 10 .venv/bin/python -m bench.split_workers [--train-size 2000] [--reverse]

The same CPU (two threads) either way: ``two_workers`` runs two ``celery worker``
processes with ``OMP_NUM_THREADS=1`` and ``REFINE_AUDIT_SPLIT_AUDITS=on`` (the audit's
positive controls go to the idle worker, ``worker/parts.py``); ``one_worker`` runs one
process with ``OMP_NUM_THREADS=2`` and the split off (the controls run after the main
chain, in the same task). Each configuration gets a fresh PostgreSQL database, Redis
database and bucket (so no cached control is reused), and runs the same tiny-effort
Fashion-MNIST audit of a small CNN with two positive controls (spec fields only). The
time is from the message being sent to the row's final status; the load average before
each run is recorded, as the machine is shared. Needs ``scripts/services.sh start``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.store import audits, parts, users
from auditor.store.artifacts import S3Credentials, S3Store, input_key
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.lifecycle import AuditStatus, is_terminal
from bench.common import RESULTS, git_commit, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.processes import deployment_env, start_celery_worker, wait_for  # noqa: E402
from shared_fixtures import claimed_redis_db, throwaway_database  # noqa: E402
from web.jobs import CeleryQueue  # noqa: E402

S3_ENDPOINT = "http://127.0.0.1:8333"
S3_CREDENTIALS = S3Credentials("refine-audit-test", "refine-audit-test-secret")  # what scripts/services.sh configures
OUT = RESULTS / "split_workers.json"
STARTUP_S = 240
AUDIT_S = 1800
CONFIGS = {
    "two_workers": {"workers": 2, "threads": "1", "split": "on"},
    "one_worker": {"workers": 1, "threads": "2", "split": "off"},
    # Not part of the comparison: shows what the second thread is worth on its own (on a busy machine, little).
    "one_worker_one_thread": {"workers": 1, "threads": "1", "split": "off"},
}


def spec(train_size: int) -> dict[str, Any]:
    return {"effort": "tiny", "data": {"train_size": train_size, "test_size": 200},
            "controls": {"attacks": ["badnets", "blended"]}}


def run_config(name: str, config: dict[str, Any], audit_spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    def fail(message: str) -> None:
        raise RuntimeError(message)

    store = S3Store(f"bench-split-{uuid.uuid4().hex[:8]}", endpoint_url=S3_ENDPOINT, credentials=S3_CREDENTIALS)
    with throwaway_database("bench_split_") as database_url, \
            claimed_redis_db("redis://127.0.0.1:6379", fail) as broker_url:
        upgrade_database(database_url)
        engine = make_engine(database_url)
        sessions = make_session_factory(engine)
        env = deployment_env(
            database_url=database_url, broker_url=broker_url, bucket=store.bucket, s3_endpoint=S3_ENDPOINT,
            access_key=S3_CREDENTIALS.access_key_id, secret_key=S3_CREDENTIALS.secret_access_key,
            REFINE_AUDIT_DATA_DIR=str(tmp / name / "data"), REFINE_AUDIT_CONTROL_CACHE="on",
            REFINE_AUDIT_SPLIT_AUDITS=config["split"], OMP_NUM_THREADS=config["threads"],
            MKL_NUM_THREADS=config["threads"],
        )
        workers = [start_celery_worker(env, tmp / f"{name}-{i}.log", hostname=f"{name}-{i}@%h")
                   for i in range(config["workers"])]
        try:
            for worker in workers:
                wait_for(lambda w=worker: "ready." in w.log_path.read_text(errors="replace"), STARTUP_S,
                         message="a worker to be ready", process=worker)
            arch = ArchConfig("small_cnn", width=4)
            model = save_classifier(build_classifier(arch), arch, tmp / f"{name}-model.safetensors")
            with session_scope(sessions) as session:
                user = users.create_user(session, f"{uuid.uuid4().hex[:8]}@example.com", "password-123")
                audit, _ = audits.create_audit(session, owner_id=user.id, spec=audit_spec, seed=0)
                audit_id = audit.id
            store.put(input_key(audit_id, "model"), model)
            load = os.getloadavg()[0]
            started = time.monotonic()
            CeleryQueue(broker_url).enqueue(audit_id, "cpu")

            def final() -> Any:
                with session_scope(sessions) as session:
                    row = audits.get_audit(session, audit_id)
                    return row if is_terminal(AuditStatus(row.status)) else None

            row = wait_for(final, AUDIT_S, message="the audit to end", process=workers[0])
            seconds = time.monotonic() - started
            with session_scope(sessions) as session:
                part_views = [parts.part_view(p) for p in parts.list_parts(session, audit_id)]
            return {"status": AuditStatus(row.status).value, "wall_seconds": round(seconds, 1),
                    "load_average_1m_before": load, "load_average_1m_after": os.getloadavg()[0],
                    "parts": part_views, **config}
        finally:
            for worker in workers:
                worker.stop()
            engine.dispose()
            for key in store.list():
                store.client.delete_object(Bucket=store.bucket, Key=key)
            store.client.delete_bucket(Bucket=store.bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--reverse", action="store_true", help="run the one-worker configurations first")
    parser.add_argument("--configs", default="two_workers,one_worker", help=f"comma-separated, of {list(CONFIGS)}")
    args = parser.parse_args()
    audit_spec = spec(args.train_size)
    results = {}
    chosen = [(name, CONFIGS[name]) for name in args.configs.split(",")]
    order = chosen[::-1] if args.reverse else chosen
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        for name, config in order:
            results[name] = run_config(name, config, audit_spec, Path(tmp))
            print(name, json.dumps(results[name]), flush=True)
    if not {"one_worker", "two_workers"} <= set(results):
        write_json(OUT.with_name(f"split_workers_{'_'.join(results)}.json"),
                   {"spec": audit_spec, "results": results, "git_commit": git_commit(),
                    "command": " ".join(["python -m bench.split_workers", *sys.argv[1:]])})
        return
    speedup = results["one_worker"]["wall_seconds"] / results["two_workers"]["wall_seconds"]
    write_json(OUT, {"spec": audit_spec, "order": [name for name, _ in order], "results": results, "speedup": round(speedup, 2),
                     "git_commit": git_commit(), "command": " ".join(["python -m bench.split_workers", *sys.argv[1:]]),
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"speed-up of two one-thread workers over one two-thread worker: {speedup:.2f}x")


if __name__ == "__main__":
    main()
