"""Start and stop real service processes (Celery worker, gunicorn) for tests and benches.

Each process gets its own session (process group), so a test can kill the worker *and*
its pool children with one ``SIGKILL``, the way a machine loss would, and so cleanup
never touches a process the test did not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import requests

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T = TypeVar("T")


@dataclass
class ServiceProcess:
    """A started process with its log file; ``stop`` is idempotent."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown handlers, no message acks."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Celery: warm shutdown), then SIGKILL if it lingers."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=30)
        else:
            self._signal_group(signal.SIGKILL)  # orphaned pool children, if any
        self._close_log()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # the group id is the leader's pid (start_new_session)
        except ProcessLookupError:
            pass

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_ok(url: str, timeout: float = 5.0) -> bool:
    """Whether ``GET url`` answers 200 now (a readiness poll for ``wait_for``)."""
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def start_process(name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> ServiceProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    popen = subprocess.Popen(
        argv, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return ServiceProcess(name, popen, log_path, log)


def service_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment minus any REFINE_AUDIT_* of the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFINE_AUDIT_")}
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def deployment_env(
    *, database_url: str, broker_url: str, bucket: str, s3_endpoint: str, access_key: str, secret_key: str,
    **extra: str,
) -> dict[str, str]:
    """What the web and worker processes of one test deployment see: its database, broker
    and bucket, the CPU, loopback allowed as a callback and model-API host; ``extra`` on top."""
    return service_env({
        "REFINE_AUDIT_ENV": "test",
        "REFINE_AUDIT_DATABASE_URL": database_url,
        "REFINE_AUDIT_BROKER_URL": broker_url,
        "REFINE_AUDIT_ARTIFACTS": f"s3://{bucket}",
        "S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "REFINE_AUDIT_DEVICE": "cpu",
        "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
        **extra,
    })


def start_celery_worker(
    env: Mapping[str, str],
    log_path: Path,
    *,
    queues: str = "cpu,gpu",
    concurrency: int = 1,
    hostname: str = "test-worker@%h",
) -> ServiceProcess:
    """``celery -A worker.celery_app worker`` as a deployment runs it (prefork pool, no scheduler)."""
    argv = [
        str(BIN / "celery"), "-A", "worker.celery_app", "worker", f"--queues={queues}",
        f"--concurrency={concurrency}", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat", f"--hostname={hostname}",
    ]
    return start_process("celery-worker", argv, env, log_path)


def start_redis_server(port: int, directory: Path, log_path: Path) -> ServiceProcess:
    """A throwaway ``redis-server`` on loopback that keeps nothing on disk: killing it loses
    every message, the harshest broker restart there is. Never the machine's own Redis."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian package redis-server; scripts/bootstrap.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory)]
    return start_process("redis-server", argv, {}, log_path)


def api_healthy(base_url: str) -> bool:
    """Whether the web app at ``base_url`` answers its health check."""
    return answers_ok(f"{base_url}/api/v1/health")


def start_gunicorn(
    app: str, env: Mapping[str, str], log_path: Path, *, bind: str, workers: int = 2, threads: int = 4
) -> ServiceProcess:
    argv = [
        str(BIN / "gunicorn"), app, f"--bind={bind}", f"--workers={workers}", f"--threads={threads}",
        "--worker-class=gthread", "--access-logfile=-", "--timeout=60",
    ]
    return start_process("gunicorn", argv, env, log_path)


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.25,
    message: str = "condition",
    process: ServiceProcess | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the process log on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if process is not None and not process.alive():
            raise AssertionError(f"{process.name} exited ({process.popen.returncode}) while waiting for {message}:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"\n{process.name} log:\n{process.log_tail()}" if process is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}{tail}")
        time.sleep(interval)
