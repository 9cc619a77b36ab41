"""schemathesis against the live API, at length: how many cases, server errors and
responses that do not match the OpenAPI document.

    .venv/bin/python -m bench.schemathesis_run [--max-examples 100] [--seed 0]

Starts the service the way the CI test does (``tests/e2e/live_api.py``: gunicorn on a
fresh PostgreSQL database, a Redis database of its own, a user with a token and one
finished audit), runs the very command of ``tests/integration/test_api_schemathesis.py``
with more examples per operation, and writes ``bench/results/schemathesis.json``:
``cases`` (generated test cases), ``server_errors`` (5xx responses), ``schema_mismatches``
(failed status-code, content-type, header or JSON Schema conformance checks), every
failed check, the response statuses, and both commands. Needs ``scripts/services.sh start``.
Exits non-zero when the run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, git_commit, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.live_api import live_api, schemathesis_args, summarize  # noqa: E402
from e2e.processes import BIN  # noqa: E402

#: Where the README's manual command points (``refine-audit serve --port 8000``).
MANUAL_URL = "http://127.0.0.1:8000/api/v1/openapi.json"


def unavailable(message: str) -> None:
    raise SystemExit(f"{message} (run scripts/services.sh start)")


def run(max_examples: int, seed: int) -> tuple[dict[str, Any], int]:
    with tempfile.TemporaryDirectory(prefix="refine-audit-schemathesis-") as tmp, \
            live_api(Path(tmp), unavailable) as api:
        ndjson = Path(tmp) / "run.ndjson"
        args = schemathesis_args(api.openapi_url, api.token, max_examples=max_examples, seed=seed, ndjson=ndjson)
        started = time.perf_counter()
        finished = subprocess.run([str(BIN / "schemathesis"), *args], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        seconds = time.perf_counter() - started
        summary = summarize(ndjson)
    manual = schemathesis_args(MANUAL_URL, "$TOKEN", max_examples=max_examples, seed=seed)
    result = {
        "cases": summary.cases,
        "server_errors": summary.server_errors,
        "schema_mismatches": summary.schema_mismatches,
        "failures": summary.failures,
        "responses": summary.responses,
        "max_examples_per_operation": max_examples,
        "seed": seed,
        "exit_code": finished.returncode,
        "seconds": round(seconds, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.schemathesis_run", *sys.argv[1:]]),
        "schemathesis_command": "schemathesis " + shlex.join(manual).replace("'Authorization: Bearer $TOKEN'", '"Authorization: Bearer $TOKEN"'),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return result, finished.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "schemathesis.json")
    args = parser.parse_args()
    result, exit_code = run(args.max_examples, args.seed)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    if exit_code or result["server_errors"] or result["schema_mismatches"]:
        raise SystemExit("schemathesis found problems: see the failures in the result")


if __name__ == "__main__":
    main()
