"""Which runner audits go through, and the limits of the sandbox they run in.

``audit_runner(settings, warn)`` is what the worker, the in-process server and the CLI
call once at start-up. It returns the sandboxed runner when bubblewrap works here; when
it does not (or ``REFINE_AUDIT_SANDBOX=none``), production refuses to start unless the
operator gave the loudly named consent, and every other mode runs audits unsandboxed
and says so through ``warn``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.settings import UNSAFE_NO_SANDBOX_CONSENT, Settings

Runner = Callable[..., Any]
NOBODY = 65534


class SandboxUnavailable(RuntimeError):
    """Production without a working sandbox and without the operator's explicit consent."""


@dataclass(frozen=True)
class SandboxPolicy:
    """Limits and the few host paths a sandboxed audit may see (read-only)."""

    memory_bytes: int  # RLIMIT_DATA of every process in the sandbox (RLIMIT_AS would break CUDA's reservations)
    cpu_seconds: int  # RLIMIT_CPU: SIGXCPU, then SIGKILL five seconds later
    wall_seconds: int  # the whole process group is killed after this long
    fmnist_dir: Path | None = None  # the built-in dataset, when the host has it
    thread_env: tuple[tuple[str, str], ...] = ()
    device: str = "auto"
    max_processes: int = 1024  # RLIMIT_NPROC (per user: binds when the sandbox runs as its own uid)
    max_file_bytes: int = 16 << 30  # RLIMIT_FSIZE: the largest file an audit may write
    sandbox_uid: int = NOBODY  # when the service runs as root, the audit runs as this user
    cancel_grace_s: float = 60.0  # after a cancel request, how long the audit may take to stop by itself
    bwrap: str = "bwrap"


def policy_from_settings(settings: Settings) -> SandboxPolicy:
    return SandboxPolicy(
        memory_bytes=settings.sandbox_memory_mb << 20,
        cpu_seconds=settings.sandbox_cpu_s,
        wall_seconds=settings.audit_time_limit_s,
        fmnist_dir=settings.fmnist_dir if settings.fmnist_dir.is_dir() else None,
        thread_env=settings.thread_env,
        device=settings.device,
    )


def audit_runner(settings: Settings, warn: Callable[[str], None]) -> Runner:
    """``run_audit``'s drop-in for this process: sandboxed when possible, refused in production when not.

    Checkpoints named by an MLflow reference are fetched here, on the trusted side, before
    the sandbox starts, and the outcome is written back after it (``auditor.registry``).
    """
    from auditor.pipeline import run_audit
    from auditor.registry.source import mlflow_config, registry_runner

    policy = sandbox_policy(settings, warn)
    if policy is None:
        return registry_runner(run_audit, mlflow_config(settings))
    from auditor.sandbox.launcher import run_audit_sandboxed

    return registry_runner(functools.partial(run_audit_sandboxed, policy=policy), mlflow_config(settings))


def sandbox_policy(settings: Settings, warn: Callable[[str], None]) -> SandboxPolicy | None:
    """The policy to sandbox audits with, or None to run them unsandboxed (after ``warn``)."""
    if settings.sandbox == "none":
        problem = "REFINE_AUDIT_SANDBOX=none"
    else:
        policy = policy_from_settings(settings)
        problem = sandbox_problem(policy)
        if problem is None:
            return policy
    if settings.is_production and not settings.unsafe_no_sandbox:
        raise SandboxUnavailable(
            f"refusing to start in production without the audit sandbox ({problem}). Install bubblewrap and allow "
            f"user namespaces (see the README), or set REFINE_AUDIT_UNSAFE_NO_SANDBOX={UNSAFE_NO_SANDBOX_CONSENT}."
        )
    warn(f"WARNING: submitted models run UNSANDBOXED, with this process's rights and secrets ({problem}).")
    return None


def require_sandbox_or_consent(settings: Settings, warn: Callable[[str], None]) -> None:
    """For processes that do not run audits themselves (the web app): the same start-up rule."""
    sandbox_policy(settings, warn)


@functools.cache
def sandbox_problem(policy: SandboxPolicy) -> str | None:
    """Why bubblewrap cannot run an audit here, or None when a trial sandbox started and exited cleanly."""
    if shutil.which(policy.bwrap) is None:
        return f"{policy.bwrap} is not installed (Debian package bubblewrap)"
    from auditor.sandbox.launcher import trial_argv

    try:
        done = subprocess.run(trial_argv(policy), capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap did not start: {exc}"
    if done.returncode != 0:
        return f"bwrap failed: {done.stderr.decode(errors='replace').strip()[:300] or done.returncode}"
    return None


def running_as_root() -> bool:
    return os.geteuid() == 0
