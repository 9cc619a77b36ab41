"""The parent side of a sandboxed audit: build the bubblewrap command, run it, watch it.
(Over 400 lines: the command, its mounts and the watch loop are read together to judge what the sandbox lets through.)

``run_audit_sandboxed`` has ``run_audit``'s signature plus a policy. It starts
``python -m auditor.sandbox.child`` inside ``bwrap`` under ``prlimit``:

* **view of the system**: ``/usr`` and the ``/lib*``/``/bin`` links, a few ``/etc`` files,
  the Python prefix, the virtualenv, the ``auditor`` package as resolved now, the
  Fashion-MNIST folder and its unpacked cache, ``/sys/devices/system/cpu`` -- all
  read-only. Not ``/run`` (PostgreSQL's socket), not the host's ``/tmp``, not the
  project checkout, not ``/root``, not the data dir. ``/proc`` and ``/dev`` are new and
  minimal, ``/tmp`` is private.
* **writable**: only the audit's ``out/`` and ``refine/`` folders (the report and the
  per-epoch REFINE checkpoints a retried audit resumes from), bound at ``/work``, and
  its ``control-cache/`` copy when it has one (the cached positive controls the
  trusted side fetched for it; what the child adds there is verified before it is
  published, see ``auditor/store/control_cache.py``).
* **inputs**: the model and dataset files, read-only at ``/inputs``.
* **identity**: a fresh environment (``--clearenv``: PATH, HOME, LANG, thread counts,
  the device, the SSRF allowlist of API audits); new user (unless root), IPC, PID, UTS
  and cgroup namespaces; no network for checkpoint audits; a new session; killed with
  its parent. Run as root, the audit drops to its own uid (``setpriv``) and to no
  capabilities; otherwise bwrap's user namespace drops them.
* **limits**: data memory (heap and anonymous mappings: what tensors allocate, unlike
  the address space CUDA reserves), CPU time, processes and file size (``prlimit``), and a
  wall clock after which the whole process group is killed.

The child reads its request from stdin and streams JSON lines on an inherited pipe:
progress, metrics, and finally the result. The parent rebuilds the ``AuditResult`` from
it, trusting nothing: artifact paths must be regular files inside ``out/``. Cancelling
creates ``cancel`` in a read-only control folder the child polls between batches.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import auditor
from auditor.errors import ErrorCode
from auditor.sandbox.policy import SandboxPolicy, running_as_root

if TYPE_CHECKING:
    from auditor.pipeline import AuditInputs, AuditResult
    from auditor.spec import AuditSpec

log = logging.getLogger(__name__)

WORK = Path("/work")  # the audit's work dir as the child sees it
INPUTS = Path("/inputs")
CONTROL = Path("/control")
CANCEL_FILE = "cancel"
CONTROL_CACHE = "control-cache"  # the audit's copy of the cached positive controls, at /work/control-cache
SANDBOX_CACHE_DIR = Path("/tmp/refine-audit")  # the child's cache folder (private /tmp)
MAX_EVENT_BYTES = 64 << 20  # the final result line carries the report
RESULT_EXIT_GRACE_S = 30.0
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group", "localtime",
             "fonts", "ssl", "ca-certificates", "ca-certificates.conf", "mime.types")
NETWORK_ETC_FILES = ("resolv.conf", "hosts", "host.conf", "gai.conf")
ARTIFACT_NAME = re.compile(r"^[\w.\-]{1,128}$")
SUMMARY_SCALARS = (str, int, float, bool, type(None))
MAX_FORWARDED_LOGS = 20_000  # log lines re-logged per audit; a chatty (or hostile) child cannot flood the log
MAX_LOG_CHARS = 4_000


@dataclass
class _Mount:
    """One read-only or writable bind of a host path at a sandbox path."""

    source: Path
    target: Path
    writable: bool = False


@dataclass
class _Layout:
    """What one sandbox sees beyond the system: the audit's folders and files."""

    mounts: list[_Mount] = field(default_factory=list)
    network: bool = False
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the command


def bwrap_argv(policy: SandboxPolicy, layout: _Layout, command: list[str]) -> list[str]:
    """``prlimit [limits] -- bwrap [namespaces, mounts, env] -- [setpriv --] command``."""
    limits = [
        "prlimit", f"--data={policy.memory_bytes}", f"--cpu={policy.cpu_seconds}:{policy.cpu_seconds + 5}",
        f"--nproc={policy.max_processes}", f"--fsize={policy.max_file_bytes}", "--core=0", "--",
    ]
    argv = [policy.bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-uts",
            "--unshare-cgroup-try"]
    root = running_as_root()
    if root:  # privileged bwrap; setpriv below drops to the sandbox uid with no capabilities
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--cap-drop", "ALL"]
    if not layout.network:
        argv.append("--unshare-net")
    argv += ["--clearenv", *_env_args(policy, layout)]
    argv += _system_mounts(layout.network)
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]  # before the binds below it
    argv += _mount_args([*_runtime_mounts(policy), *layout.mounts])
    argv += _gpu_devices(policy)
    argv += ["--chdir", "/tmp", "--"]
    if root:
        argv += ["setpriv", f"--reuid={policy.sandbox_uid}", f"--regid={policy.sandbox_uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return limits + argv + command


def trial_argv(policy: SandboxPolicy) -> list[str]:
    """A sandbox with the audit's system view that starts Python and exits: does bwrap work here?"""
    return bwrap_argv(policy, _Layout(), [sys.executable, "-c", "import encodings"])


def _env_args(policy: SandboxPolicy, layout: _Layout) -> list[str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "PYTHONPATH": str(_package_root()),
        "PYTHONDONTWRITEBYTECODE": "1",
        **dict(policy.thread_env),
        **layout.env,
    }
    return [arg for name, value in env.items() for arg in ("--setenv", name, value)]


def _system_mounts(network: bool) -> list[str]:
    """/usr, the merged-/usr links, and the /etc files Python, fonts and TLS read."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_FILES + (NETWORK_ETC_FILES if network else ()):
        if Path("/etc", name).exists():
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    return args


def _package_root() -> Path:
    """The folder holding the ``auditor`` package this process runs (a worktree, a checkout or site-packages)."""
    return Path(auditor.__file__).resolve().parent.parent


def _runtime_mounts(policy: SandboxPolicy) -> list[_Mount]:
    """Python, its virtualenv, this ``auditor`` package, the CPU topology, the built-in dataset's folder."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent,
             Path(auditor.__file__).resolve().parent, Path("/sys/devices/system/cpu")}
    outermost = [p for p in paths if not any(other in p.parents for other in paths)]
    mounts = [_Mount(p, p) for p in sorted(outermost) if p.exists() and not _under_usr(p)]
    if policy.fmnist_dir is not None and not _under_usr(policy.fmnist_dir):
        mounts.append(_Mount(policy.fmnist_dir, policy.fmnist_dir))
    return mounts


def _under_usr(path: Path) -> bool:
    return path == Path("/usr") or Path("/usr") in path.parents


def _fmnist_cache(policy: SandboxPolicy, inputs: AuditInputs) -> _Mount | None:
    """The unpacked Fashion-MNIST files, unpacked here once (world-readable) rather than in every audit."""
    from auditor.data.datasets import unpack_fashion_mnist
    from auditor.errors import AuditError

    try:
        cache = unpack_fashion_mnist(policy.fmnist_dir, inputs.cache_dir)
    except (AuditError, OSError):
        return None  # the audit reports the missing dataset itself
    if any(not f.stat().st_mode & stat.S_IROTH for f in cache.iterdir() if not f.name.endswith(".part")):
        return None  # private files of an older version: the audit unpacks its own copy in its /tmp
    return _Mount(cache, SANDBOX_CACHE_DIR / "fmnist")


def _mount_args(mounts: list[_Mount]) -> list[str]:
    """Parents first, created world-readable (bwrap would make them 0700, unreadable to the sandbox uid)."""
    args: list[str] = []
    made: set[Path] = {Path("/"), Path("/tmp"), Path("/etc"), Path("/usr")}
    for mount in sorted(mounts, key=lambda m: len(m.target.parts)):
        for parent in reversed(mount.target.parents):
            if parent not in made and not _under_usr(parent):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--bind" if mount.writable else "--ro-bind", str(mount.source), str(mount.target)]
        made.add(mount.target)
    return args


def _gpu_devices(policy: SandboxPolicy) -> list[str]:
    """NVIDIA device nodes, when the audit may use CUDA (untested here: no GPU on CI)."""
    if policy.device == "cpu":
        return []
    return [arg for dev in sorted(glob.glob("/dev/nvidia*")) for arg in ("--dev-bind", dev, dev)]


# ---------------------------------------------------------------------------- one audit


def run_audit_sandboxed(
    spec: AuditSpec,
    inputs: AuditInputs,
    on_progress: Callable[[str, int, int], None] = lambda *_: None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_metrics: Callable[[str, dict[str, Any]], None] | None = None,
    *,
    policy: SandboxPolicy,
) -> AuditResult:
    """``run_audit`` in a bubblewrap sandbox; a killed or crashed child ends the audit with a clear code.

    The checkpoint's container (statically, as the web does) and a model API's URL (the SSRF
    guard) are checked here first: what those checks refuse fails the audit at once, not after
    the sandbox's seconds of start-up. The sandbox checks both again before using them.
    """
    work_dir = Path(inputs.work_dir).absolute()
    refused = _refused_before_start(spec, inputs)
    if refused is not None:
        from auditor.pipeline import AuditResult

        return AuditResult("failed", work_dir / "out", summary={"status": "failed"}, error=refused)
    outcome = run_sandboxed(spec, inputs, policy, on_progress, should_cancel, on_metrics)
    return _rebuild_result(outcome, work_dir / "out")


def run_sandboxed(
    spec: AuditSpec,
    inputs: AuditInputs,
    policy: SandboxPolicy,
    on_progress: Callable[[str, int, int], None] = lambda *_: None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_metrics: Callable[[str, dict[str, Any]], None] | None = None,
    program: list[str] | None = None,
) -> SandboxOutcome:
    """Run ``program`` (default: the audit child) in the sandbox an audit of ``spec`` gets."""
    work_dir = Path(inputs.work_dir).absolute()
    control = Path(tempfile.mkdtemp(prefix="refine-audit-sandbox-"))
    try:
        layout = _audit_layout(spec, inputs, work_dir, control, policy)
        run = _ChildRun(policy, layout, control, on_progress, should_cancel, on_metrics)
        return run.execute(_request(spec, inputs, policy), program)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def _refused_before_start(spec: AuditSpec, inputs: AuditInputs) -> dict[str, Any] | None:
    from auditor.blackbox.ssrf import check_url
    from auditor.errors import AuditError
    from auditor.models.containers import inspect_checkpoint

    try:
        if inputs.model_path is not None:
            inspect_checkpoint(inputs.model_path)
        if spec.model.source == "api":
            check_url(str(spec.model.api.url), inputs.allowed_hosts)
    except AuditError as exc:
        return exc.to_dict()
    return None


def _audit_layout(spec: AuditSpec, inputs: AuditInputs, work_dir: Path, control: Path,
                  policy: SandboxPolicy) -> _Layout:
    network = spec.model.source == "api"
    if running_as_root():  # the sandbox uid stats the cancel file and reads copied inputs
        os.chown(control, policy.sandbox_uid, policy.sandbox_uid)
    layout = _Layout(network=network, mounts=[_Mount(control, CONTROL)])
    for name in ("out", "refine"):
        layout.mounts.append(_Mount(_writable_dir(work_dir / name, policy), WORK / name, writable=True))
    if inputs.control_cache is not None:
        layout.mounts.append(_Mount(_writable_dir(Path(inputs.control_cache), policy), WORK / CONTROL_CACHE,
                                    writable=True))
    for name, path in (("model", inputs.model_path), ("dataset", inputs.dataset_path)):
        if path is not None:
            layout.mounts.append(_Mount(_readable_input(Path(path), control, policy), INPUTS / name))
    cache = _fmnist_cache(policy, inputs) if spec.data.source == "fashion-mnist" and policy.fmnist_dir else None
    if cache is not None:
        layout.mounts.append(cache)
    return layout


def _writable_dir(path: Path, policy: SandboxPolicy) -> Path:
    """A real folder (never a link a previous run planted), owned by the sandbox uid when we are root."""
    path.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise RuntimeError(f"{path} is not a directory")
    if running_as_root():
        for folder, dirs, files in os.walk(path):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.chown(name, policy.sandbox_uid, policy.sandbox_uid, follow_symlinks=False)
    return path


def _readable_input(path: Path, control: Path, policy: SandboxPolicy) -> Path:
    """The sandbox uid must be able to read an input; a private file is copied into the control folder."""
    if not running_as_root() or os.stat(path).st_mode & stat.S_IROTH:
        return path
    copy = control / f"input-{len(list(control.iterdir()))}"
    shutil.copyfile(path, copy)
    os.chmod(copy, 0o644)
    return copy


def _request(spec: AuditSpec, inputs: AuditInputs, policy: SandboxPolicy) -> dict[str, Any]:
    return {
        "spec": spec.model_dump(mode="json"),
        "inputs": {
            "work_dir": str(WORK),
            "model_path": str(INPUTS / "model") if inputs.model_path is not None else None,
            "dataset_path": str(INPUTS / "dataset") if inputs.dataset_path is not None else None,
            "allowed_hosts": list(inputs.allowed_hosts),
            "audit_id": inputs.audit_id,
            "device": inputs.device,
            "fmnist_dir": str(policy.fmnist_dir or inputs.fmnist_dir),
            "cache_dir": str(SANDBOX_CACHE_DIR),  # the unpacked Fashion-MNIST is bound below it
            "control_cache": str(WORK / CONTROL_CACHE) if inputs.control_cache is not None else None,
            "only_control": inputs.only_control,
        },
        "cancel_file": str(CONTROL / CANCEL_FILE),
    }


@dataclass
class SandboxOutcome:
    """What the parent learned: the child's result message, or how the child ended without one."""

    result: dict[str, Any] | None
    error: dict[str, Any] | None = None
    cancelled: bool = False


class _ChildRun:
    """Start the child, relay its events, enforce the wall clock and the cancel grace period."""

    def __init__(self, policy: SandboxPolicy, layout: _Layout, control: Path,
                 on_progress: Callable[[str, int, int], None], should_cancel: Callable[[], bool],
                 on_metrics: Callable[[str, dict[str, Any]], None] | None):
        self.policy, self.layout, self.control = policy, layout, control
        self.on_progress, self.should_cancel, self.on_metrics = on_progress, should_cancel, on_metrics
        self.result: dict[str, Any] | None = None
        self.buffer = b""
        self.forwarded_logs = 0

    def execute(self, request: dict[str, Any], program: list[str] | None = None) -> SandboxOutcome:
        """Run ``program`` (default: the audit child) with ``--events-fd N`` appended."""
        read_fd, write_fd = os.pipe()
        command = [*(program or [sys.executable, "-m", "auditor.sandbox.child"]), "--events-fd", str(write_fd)]
        argv = bwrap_argv(self.policy, self.layout, command)
        with tempfile.TemporaryFile() as stderr:
            try:
                child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stderr, stderr=stderr,
                                         pass_fds=(write_fd,), start_new_session=True)
            except OSError as exc:
                os.close(read_fd)
                return SandboxOutcome(None, _error(ErrorCode.SANDBOX_UNAVAILABLE, f"The audit sandbox did not start: {exc}"))
            finally:
                os.close(write_fd)
            try:
                self._send_request(child, request)
                outcome = self._watch(child, read_fd)
            except _ProtocolError as exc:
                outcome = SandboxOutcome(None, _error(ErrorCode.SANDBOX_CRASHED, f"The sandboxed audit misbehaved: {exc}."))
            finally:
                _kill_group(child)
                os.close(read_fd)
            if outcome.result is None and outcome.error is None:
                outcome.error = self._death(child.returncode, _tail(stderr))
        return outcome

    def _send_request(self, child: subprocess.Popen[bytes], request: dict[str, Any]) -> None:
        try:
            child.stdin.write(json.dumps(request).encode())
            child.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child died at once; _watch sees it exit

    def _watch(self, child: subprocess.Popen[bytes], read_fd: int) -> SandboxOutcome:
        deadline = time.monotonic() + self.policy.wall_seconds
        cancel_deadline: float | None = None
        open_pipe = True
        while open_pipe or child.poll() is None:
            if open_pipe:
                open_pipe = self._read_events(read_fd, timeout=0.25)
            else:
                time.sleep(0.05)
            now = time.monotonic()
            if self.result is not None and not open_pipe:
                deadline = min(deadline, now + RESULT_EXIT_GRACE_S)  # done: lingering threads get a moment
            if now > deadline and self.result is not None:
                break
            if now > deadline:
                _kill_group(child)
                message = f"The audit ran past its wall-clock limit of {self.policy.wall_seconds} s and was killed."
                return SandboxOutcome(None, _error(ErrorCode.SANDBOX_LIMIT_EXCEEDED, message))
            if cancel_deadline is None and self.should_cancel():
                (self.control / CANCEL_FILE).touch()
                cancel_deadline = now + self.policy.cancel_grace_s
            elif cancel_deadline is not None and now > cancel_deadline and self.result is None:
                _kill_group(child)
                return SandboxOutcome(None, cancelled=True)
        return SandboxOutcome(self.result)

    def _read_events(self, read_fd: int, timeout: float) -> bool:
        """Relay complete lines; False once the child closed its end."""
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if not ready:
            return True
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        if len(self.buffer) > MAX_EVENT_BYTES:
            raise _ProtocolError("the sandboxed audit sent an oversized message")
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._dispatch(line)
        return True

    def _dispatch(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("sandbox: ignoring a malformed event line")
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "progress" and _progress_ok(event):
            self.on_progress(event["stage"], event["done"], event["total"])
        elif kind == "metrics" and self.on_metrics is not None and isinstance(event.get("metrics"), dict):
            metrics = {str(k)[:64]: v for k, v in list(event["metrics"].items())[:64] if isinstance(v, SUMMARY_SCALARS)}
            self.on_metrics(str(event.get("stage"))[:32], metrics)
        elif kind == "log" and self.forwarded_logs < MAX_FORWARDED_LOGS:
            self._forward_log(event)
        elif kind == "result":
            self.result = event

    def _forward_log(self, event: dict[str, Any]) -> None:
        """Re-log a sandboxed pipeline line here (size-capped: the child is not trusted), under
        ``sandbox.<its logger>`` so a reader can tell where it came from."""
        level, name, message = event.get("level"), event.get("logger"), event.get("message")
        if not (isinstance(level, int) and isinstance(name, str) and isinstance(message, str)):
            return
        self.forwarded_logs += 1
        level = min(max(level, logging.DEBUG), logging.ERROR)
        logging.getLogger(f"sandbox.{name[:64]}").log(level, "%s", message[:MAX_LOG_CHARS])

    def _death(self, returncode: int | None, stderr_tail: str) -> dict[str, Any]:
        """Why the child ended without a result, as the error the audit reports."""
        if stderr_tail:
            log.warning("sandboxed audit ended without a result (status %s); its last output:\n%s", returncode, stderr_tail)
        signals = {128 + signal.SIGXCPU: f"its CPU-time limit of {self.policy.cpu_seconds} s",
                   128 + signal.SIGXFSZ: f"its file-size limit of {self.policy.max_file_bytes >> 20} MiB",
                   128 + signal.SIGKILL: "a kill signal (out of memory?)"}
        if returncode in signals:
            return _error(ErrorCode.SANDBOX_LIMIT_EXCEEDED, f"The sandboxed audit was stopped by {signals[returncode]}.")
        if returncode is not None and returncode > 128:
            return _error(ErrorCode.SANDBOX_CRASHED, f"The sandboxed audit crashed ({_signal_name(returncode - 128)}).")
        return _error(ErrorCode.SANDBOX_CRASHED, f"The sandboxed audit exited (status {returncode}) without a result.")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _ProtocolError(RuntimeError):
    """The child broke the event protocol (a compromised or broken child)."""


def _progress_ok(event: dict[str, Any]) -> bool:
    stage, done, total = event.get("stage"), event.get("done"), event.get("total")
    return isinstance(stage, str) and len(stage) <= 32 and isinstance(done, int) and isinstance(total, int)


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the sandbox's process group; its PID namespace takes every process inside with it."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.wait()


def _tail(handle: Any, limit: int = 4000) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - limit))
    return handle.read().decode(errors="replace").strip()


def _error(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"code": code.value, "message": message, "detail": {}}


# ---------------------------------------------------------------------------- the result


def _rebuild_result(outcome: SandboxOutcome, out_dir: Path) -> AuditResult:
    """An ``AuditResult`` from the child's message, every field checked: the child is untrusted."""
    from auditor.pipeline import AuditResult

    if outcome.cancelled:
        return AuditResult("cancelled", out_dir, error=_error(ErrorCode.CANCELLED, "The audit was cancelled."))
    message = outcome.result
    if message is None or message.get("status") not in ("succeeded", "failed", "cancelled"):
        error = outcome.error or _error(ErrorCode.SANDBOX_CRASHED, "The sandboxed audit sent no valid result.")
        return AuditResult("failed", out_dir, error=error)
    artifacts = _artifacts(message.get("artifacts"), out_dir)
    report = message.get("report") if isinstance(message.get("report"), dict) else None
    summary = _summary(message.get("summary"))
    if artifacts is None:
        error = _error(ErrorCode.SANDBOX_CRASHED, "The sandboxed audit listed artifacts outside its folder.")
        return AuditResult("failed", out_dir, None, {"status": "failed"}, [], error)
    error = _child_error(message.get("error")) if message["status"] != "succeeded" else None
    return AuditResult(message["status"], out_dir, report, summary, artifacts, error)


def _artifacts(raw: Any, out_dir: Path) -> list[Any] | None:
    """Regular files inside ``out_dir`` only (no links, no escapes); None when any entry is not."""
    from auditor.pipeline import ArtifactFile

    if not isinstance(raw, list):
        return None
    artifacts = []
    for item in raw:
        if not isinstance(item, dict) or not ARTIFACT_NAME.match(str(item.get("name", ""))):
            return None
        host = _host_path(str(item.get("path", "")), out_dir)
        if host is None:
            return None
        artifacts.append(ArtifactFile(item["name"], host, str(item.get("kind", "data"))[:32],
                                      str(item.get("content_type", "application/octet-stream"))[:100]))
    return artifacts


def _host_path(sandbox_path: str, out_dir: Path) -> Path | None:
    """``/work/out/a/b`` -> ``<out_dir>/a/b`` when every component is a real folder and the file is regular."""
    try:
        relative = Path(sandbox_path).relative_to(WORK / "out")
    except ValueError:
        return None
    if not relative.parts or ".." in relative.parts:
        return None
    current = out_dir
    for i, part in enumerate(relative.parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            return None
        last = i == len(relative.parts) - 1
        if (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
            return None
    return current


def _summary(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    return {str(k)[:64]: (v[:1000] if isinstance(v, str) else v)
            for k, v in list(raw.items())[:64] if isinstance(v, SUMMARY_SCALARS)}


def _child_error(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("code") not in {c.value for c in ErrorCode}:
        return _error(ErrorCode.INTERNAL_ERROR, "The sandboxed audit failed without a valid error.")
    detail = raw.get("detail") if isinstance(raw.get("detail"), dict) else {}
    return {"code": raw["code"], "message": str(raw.get("message", ""))[:2000], "detail": detail}
