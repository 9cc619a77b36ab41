"""The real bubblewrap sandbox: what code that escaped the loader could reach (nothing), and how
the parent ends a child that hangs, burns CPU, crashes, is cancelled or lies about its artifacts.

A probe script stands in for such a payload: it is handed to the sandbox exactly as a model
file is (``/inputs/model``) and run by the same launcher. Under CI a missing bwrap fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from shared_fixtures import service_missing

from auditor.pipeline import AuditInputs
from auditor.sandbox import policy_from_settings, sandbox_problem
from auditor.sandbox.launcher import SandboxOutcome, _rebuild_result, run_sandboxed
from auditor.sandbox.policy import NOBODY, SandboxPolicy, running_as_root
from auditor.settings import Settings
from auditor.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT_SPEC = parse_spec({"effort": "tiny"})



@pytest.fixture(scope="module")
def policy() -> SandboxPolicy:
    settings = Settings.from_env({"REFINE_AUDIT_AUDIT_TIME_LIMIT_S": "120", "REFINE_AUDIT_DEVICE": "cpu"})
    built = policy_from_settings(settings)
    problem = sandbox_problem(built)
    if problem is not None:
        service_missing(f"the bubblewrap sandbox does not work here: {problem}", hint="scripts/bootstrap.sh installs bubblewrap")
    return built


def run_program(tmp_path: Path, policy: SandboxPolicy, source: str, **kwargs) -> SandboxOutcome:
    """Run ``source`` as the 'model' of a checkpoint audit, with the audit's sandbox."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "payload.py"
    script.write_text(source)
    inputs = AuditInputs(tmp_path / "work", model_path=script)
    return run_sandboxed(CHECKPOINT_SPEC, inputs, policy, program=[sys.executable, "/inputs/model"], **kwargs)


PROBE = r'''
import json, os, socket, sys
found = {"env": [], "environ_files": [], "connected": [], "readable": [], "written": []}
for name in ("REFINE_AUDIT_DATABASE_URL", "REFINE_AUDIT_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
             "REFINE_AUDIT_BROKER_URL", "S3_ENDPOINT_URL"):
    if name in os.environ:
        found["env"].append(name)
for pid in os.listdir("/proc"):
    try:
        if pid.isdigit() and b"SECRET" in open(f"/proc/{pid}/environ", "rb").read():
            found["environ_files"].append(pid)
    except OSError:
        pass
for host, port in [("127.0.0.1", 5432), ("127.0.0.1", 6379), ("127.0.0.1", 8333), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        found["connected"].append(f"{host}:{port}")
    except OSError:
        pass
for path in ("/var/run/postgresql/.s.PGSQL.5432", "/run/postgresql/.s.PGSQL.5432", "/tmp/.s.PGSQL.5432"):
    try:
        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path); s.close()
        found["connected"].append(path)
    except OSError:
        pass
for path in READ:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        found["readable"].append(path)
    except OSError:
        pass
for path in ("/usr/probe", "/etc/probe", "/work/probe", "/inputs/model", "/control/probe", "/probe"):
    try:
        open(path, "a").write("x")
        found["written"].append(path)
    except OSError:
        pass
open("/work/out/probe-ran", "w").write("ok")
open("/tmp/probe-private", "w").write("ok")
found["uid"] = os.getuid()
os.write(int(sys.argv[-1]), (json.dumps({"type": "result", "status": "failed", "findings": found}) + "\n").encode())
'''


def test_code_inside_the_sandbox_finds_no_secret_socket_network_or_writable_host_path(
    tmp_path: Path, policy: SandboxPolicy, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    for name in ("REFINE_AUDIT_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("REFINE_AUDIT_DATABASE_URL", pg_url)
    data_dir = tmp_path / "data"
    (data_dir / "other-audit").mkdir(parents=True)
    (data_dir / "other-audit" / "model").write_text(secret)
    with tempfile.NamedTemporaryFile("w", dir="/tmp", suffix=".secret") as host_tmp:
        host_tmp.write(secret)
        host_tmp.flush()
        # Files and folders that exist on the host (the sandbox has bare skeleton folders of its own)
        readable = [host_tmp.name, str(data_dir / "other-audit" / "model"), str(REPO / "pyproject.toml"),
                    str(REPO / ".data"), "/work/main/.data", "/etc/shadow", "/run/postgresql", "/var/run/postgresql",
                    str(Path.home() / ".ssh"), str(Path.home() / ".bashrc"), str(Path.home() / ".cache")]
        source = f"READ = {json.dumps(readable)}\n" + PROBE
        outcome = run_program(data_dir, policy, source)
    assert outcome.result is not None, outcome.error
    found = outcome.result["findings"]
    assert {k: v for k, v in found.items() if k != "uid" and v} == {}
    assert (data_dir / "work" / "out" / "probe-ran").read_text() == "ok"  # the probe did run, and could write there
    assert not Path("/tmp/probe-private").exists()  # its /tmp is its own
    if running_as_root():
        assert found["uid"] == NOBODY


def processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_hung_audit_is_killed_at_the_wall_clock_with_everything_it_started(tmp_path: Path, policy: SandboxPolicy) -> None:
    token = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    source = (f"import subprocess, time\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
              "time.sleep(600)\n")
    started = time.monotonic()
    outcome = run_program(tmp_path, replace(policy, wall_seconds=5), source)
    assert outcome.error["code"] == "sandbox_limit_exceeded"
    assert "wall-clock" in outcome.error["message"]
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(token) == []


def test_cpu_time_limit_and_crashes_end_the_audit_with_their_codes(tmp_path: Path, policy: SandboxPolicy) -> None:
    burn = run_program(tmp_path / "burn", replace(policy, cpu_seconds=1), "while True:\n    pass\n")
    assert burn.error["code"] == "sandbox_limit_exceeded" and "CPU-time" in burn.error["message"]
    crash = run_program(tmp_path / "crash", policy, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert crash.error["code"] == "sandbox_crashed" and "SIGSEGV" in crash.error["message"]
    memory = run_program(tmp_path / "memory", replace(policy, memory_bytes=1 << 30),
                         "import sys\ntry:\n    bytearray(4 << 30)\nexcept MemoryError:\n    sys.exit(42)\n")
    assert memory.error["code"] == "sandbox_crashed" and "status 42" in memory.error["message"]


def test_cancel_reaches_the_child_through_its_cancel_file(tmp_path: Path, policy: SandboxPolicy) -> None:
    source = ("import json, os, sys, time\nrequest = json.loads(sys.stdin.read())\n"
              "while not os.path.exists(request['cancel_file']):\n    time.sleep(0.05)\n"
              "os.write(int(sys.argv[-1]), b'{\"type\": \"result\", \"status\": \"cancelled\"}\\n')\n")
    asked = time.monotonic() + 1.0
    outcome = run_program(tmp_path, policy, source, should_cancel=lambda: time.monotonic() > asked)
    assert outcome.result == {"type": "result", "status": "cancelled"}


def test_artifacts_that_are_links_out_of_the_work_dir_are_refused(tmp_path: Path, policy: SandboxPolicy) -> None:
    source = ("import json, os, sys\nos.symlink('/etc/passwd', '/work/out/report.json')\n"
              "artifact = {'name': 'report.json', 'path': '/work/out/report.json', 'kind': 'report', 'content_type': 'x'}\n"
              "os.write(int(sys.argv[-1]), (json.dumps({'type': 'result', 'status': 'succeeded', 'summary': {},"
              " 'artifacts': [artifact]}) + '\\n').encode())\n")
    outcome = run_program(tmp_path, policy, source)
    result = _rebuild_result(outcome, tmp_path / "work" / "out")
    assert result.status == "failed" and result.error["code"] == "sandbox_crashed" and result.artifacts == []
