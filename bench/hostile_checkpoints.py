"""The hostile-checkpoint corpus against the running product: REST and CLI.

    .venv/bin/python -m bench.hostile_checkpoints

Builds the corpus of ``tests/hostile_corpus.py`` (pickles, torch.save objects in both
formats, .pt2 archives with pickled constants / sample inputs / sympy expressions /
guard code, tampered TorchScript pickles, zip-slip names and links, absurd tensor shapes,
lying safetensors headers) in a temporary folder, then:

* **REST**: starts ``refine-audit serve`` (the web app with its in-process, sandboxed
  worker queue; SQLite and a local artifact folder in a fresh data dir), creates a user
  and a token with the CLI, and submits every file with ``POST /api/v1/audits``;
* **CLI**: runs ``refine-audit audit FILE`` for every file, as a separate process.

A case counts as refused when REST answered 422 ``invalid_checkpoint`` and the CLI exited 2
naming ``invalid_checkpoint``; ``payload_ran`` counts the marker files the payloads would
have created. Writes ``bench/results/hostile_checkpoints.json``.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import RESULTS, git_commit, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.processes import service_env, start_process, wait_for  # noqa: E402
from hostile_corpus import build_corpus  # noqa: E402

CLI = [str(Path(sys.executable).parent / "refine-audit")]
SPEC = '{"effort": "tiny"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, input=stdin, timeout=600)


def api_token(env: dict[str, str]) -> str:
    email = "bench@example.com"
    created = cli(["user", "create", "--email", email, "--password", "bench-password"], env)
    assert created.returncode == 0, created.stderr
    token = cli(["token", "create", "--email", email], env)
    assert token.returncode == 0, token.stderr
    return token.stdout.strip().splitlines()[-1]


def submit_over_rest(base: str, token: str, path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        response = requests.post(f"{base}/api/v1/audits", headers={"Authorization": f"Bearer {token}"},
                                 files={"model": (path.name, handle)}, data={"spec": SPEC}, timeout=120)
    code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
    return {"status": response.status_code, "code": code,
            "refused": response.status_code == 422 and code == "invalid_checkpoint"}


def submit_through_cli(path: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    done = cli(["audit", str(path), "--out", str(out), "--effort", "tiny", "--quiet"], env)
    said = done.stdout + done.stderr
    return {"exit": done.returncode, "refused": done.returncode == 2 and "invalid_checkpoint" in said,
            "unsandboxed": "UNSANDBOXED" in said}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp:
        root = Path(tmp)
        corpus = build_corpus(root / "corpus")
        env = service_env({"REFINE_AUDIT_DATA_DIR": str(root / "data"), "REFINE_AUDIT_ENV": "development"})
        port = free_port()
        server = start_process("serve", [*CLI, "serve", "--port", str(port)], env, root / "serve.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _healthy(base), 120, message="refine-audit serve", process=server)
            token = api_token(env)
            cases = []
            for case, path, marker in corpus:
                rest = submit_over_rest(base, token, path)
                through_cli = submit_through_cli(path, root / "cli" / case.name, env)
                cases.append({"case": case.name, "rest": rest, "cli": through_cli, "payload_ran": marker.exists()})
                print(f"{case.name:32} REST {rest['status']} {rest['code']}  CLI exit {through_cli['exit']}"
                      f"  payload ran: {marker.exists()}", flush=True)
        finally:
            server.stop()
    result = {
        "cases": len(cases),
        "refused": sum(c["rest"]["refused"] and c["cli"]["refused"] for c in cases),
        "payload_ran": sum(c["payload_ran"] for c in cases),
        "refused_over_rest": sum(c["rest"]["refused"] for c in cases),
        "refused_by_cli": sum(c["cli"]["refused"] for c in cases),
        "per_case": cases,
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.hostile_checkpoints", *sys.argv[1:]]),
        "git_commit": git_commit(),
    }
    write_json(RESULTS / "hostile_checkpoints.json", result)
    print(f"{result['refused']}/{result['cases']} refused over REST and the CLI; payloads that ran: {result['payload_ran']}")


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v1/health", timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


if __name__ == "__main__":
    main()
