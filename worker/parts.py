"""One audit, many workers: its positive controls run as separate Celery tasks.

Why the controls: they are the independent, costly part of an audit. A control is our
own model -- trained on the audit's data with a planted backdoor, then defended with
REFINE -- and depends only on the data, the attack, the control settings, the seed and
the submitted model's *family*, never on its weights; the rest of the audit (data,
load, surrogate, detect, REFINE of the submitted model, evaluation) is one chain. So
a split audit is the usual main task plus one **control task** per planned control,
sent by the main task when it starts; on N idle workers the controls train beside the
main chain instead of after it.

How results travel: through the content-addressed control cache. A control task runs
the pipeline in control-only mode (``auditor.pipeline.run.run_control_part``, in the
sandbox like any audit, since loading the submitted model is how its family is known)
and uploads the verified entries to the audit's own prefix (``part_prefix``), never to
the shared cache: an audit whose entries may not feed other audits (``may_publish``)
splits too. The main task copies finished parts' entries into its local cache folder
while it runs, and its pipeline reuses them exactly as it reuses cached controls
(re-scored on its own test images), so a split audit's report equals an unsplit one's.

Why no deadlock and no lost part (the ``audit_parts`` row is the claim, see
``auditor/store/parts.py``): the main pipeline waits for a part only while the part's
``.pending`` file exists (``controls._await_part``). This module's ``sync`` -- a chore
of the main task's keep-alive thread -- removes it once the part is done (entries
copied in), failed, or *taken*: when the pipeline says it is waiting and no live task
holds the part (still queued behind this very audit on a one-worker cluster, or its
worker died: heartbeat frozen), the main task takes the part and trains the control
itself. A control task that finds its part taken, done, or its audit over or
cancelled stops (its heartbeat reads the audit row's cancel flag). If the main task's
worker dies, the sweep restarts the audit as before and the restart re-queues every
part that is neither done nor held by a live task; finished parts are reused.

In-process mode and the CLI never split (no ``Dispatch``); neither does an audit whose
controls cannot be cached (unlabelled data: the controls learn the submitted model's
own answers) or whose controls are already in the shared cache.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from auditor.pipeline import AuditInputs, AuditResult
from auditor.pipeline import cache as cc
from auditor.settings import Settings
from auditor.spec import AuditSpec, parse_spec
from auditor.store import audits as rows
from auditor.store import parts as part_rows
from auditor.store.artifacts import ArtifactStore
from auditor.store.control_cache import LOCAL_DIR, ControlCacheSync, part_prefix, planned_control_groups
from auditor.store.db import session_scope

log = logging.getLogger(__name__)

WAIT_POLL_S = 1.0  # how soon a waiting pipeline's part is collected or taken back
Runner = Callable[..., AuditResult]


@dataclass(frozen=True)
class Dispatch:
    """How a main task sends its control tasks, and the name of the worker it runs on."""

    send: Callable[[str, str], None]  # (audit id, control name) -> one control task on the broker
    worker: str


class ControlParts:
    """The main task's side of a split audit (module docstring): send, then collect or take back."""

    def __init__(self, audit_id: str, sessions: sessionmaker[Session], store: Callable[[], ArtifactStore],
                 dispatch: Dispatch, stale_after: timedelta, on_parts: Callable[[dict[str, str]], None]):
        self.audit_id = audit_id
        self.on_parts = on_parts  # the progress row's view of the parts (``RowLink.on_parts``)
        self.sessions = sessions
        self.store = store
        self.dispatch = dispatch
        self.stale_after = stale_after
        self.groups: dict[str, str] = {}
        self.root: Path | None = None
        self.pending: set[str] = set()
        self._lock = threading.Lock()  # sync runs on the keep-alive thread, prepare on the pipeline's

    def wrap(self, runner: Runner) -> Runner:
        """``runner`` with the parts sent first; ``run_with_control_cache`` calls it with the cache folder set."""
        def split_runner(spec: AuditSpec, inputs: AuditInputs, *callbacks: Any) -> AuditResult:
            try:
                self.prepare(spec, inputs)
            except Exception as exc:  # noqa: BLE001 -- unsplit is always correct, only slower
                log.warning("audit %s: controls not split (%s); they run in this task", self.audit_id, exc)
                self._drop_pending()
            with self._answering_waits():
                return runner(spec, inputs, *callbacks)
        return split_runner

    @contextmanager
    def _answering_waits(self) -> Iterator[None]:
        """While the pipeline waits for a part, ``sync`` every ``WAIT_POLL_S`` instead of every keep-alive beat
        (15 s in production): a one-worker cluster takes a queued part back within a second or two. Only local
        files are polled until the pipeline actually waits."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(WAIT_POLL_S):
                if self._waited_for():
                    try:
                        self.sync()
                    except Exception as exc:  # noqa: BLE001 -- the keep-alive chore tries again
                        log.warning("audit %s: parts not synced: %s", self.audit_id, exc)

        thread = threading.Thread(target=watch, name="audit-parts", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=WAIT_POLL_S + 5)

    def _waited_for(self) -> bool:
        with self._lock:
            root = self.root
            return root is not None and any(cc.waiting_file(root, name).exists() for name in self.pending)

    def prepare(self, spec: AuditSpec, inputs: AuditInputs) -> None:
        """Reuse the parts an earlier attempt finished, queue the rest and mark them pending for the pipeline."""
        if inputs.control_cache is None:
            return
        root = Path(inputs.control_cache)
        groups = planned_control_groups(spec, inputs)
        if not groups or len(groups) != len(set(groups.values())):
            return  # not cacheable (or two controls share a group): nothing to hand over
        sync = ControlCacheSync(self.store(), root, self.audit_id, prefix=part_prefix(self.audit_id))
        sync.fetch(groups.values())  # parts finished by an earlier attempt of this audit
        names = [name for name, group in groups.items() if not _has_control(root, group)]
        if not names:
            return
        with session_scope(self.sessions) as session:
            statuses = part_rows.plan_parts(session, self.audit_id, names, self.stale_after)
            queued = sorted(n for n, s in statuses.items() if s == part_rows.QUEUED)
            rows.record_event(session, self.audit_id, "part", f"Positive controls {', '.join(queued) or 'none'} "
                              f"queued as their own tasks by {self.dispatch.worker}.", stage="evaluate",
                              data={"worker": self.dispatch.worker, "parts": statuses})
        (root / cc.PARTS_DIR).mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.root, self.groups = root, groups
            for name, status in statuses.items():
                if status != part_rows.DONE:
                    cc.pending_file(root, name).touch()
                    self.pending.add(name)
        for name, status in statuses.items():
            if status == part_rows.QUEUED:
                self.dispatch.send(self.audit_id, name)
        log.info("audit %s: positive controls %s sent to other workers", self.audit_id, sorted(self.pending))

    def sync(self) -> None:
        """Collect finished parts, release failed ones, take back waited-for ones nobody runs (a keep-alive chore)."""
        with self._lock:
            if self.root is None:
                return
            for name in sorted(self.pending):
                if self._settled(name):
                    cc.pending_file(self.root, name).unlink(missing_ok=True)
                    self.pending.discard(name)
            with session_scope(self.sessions) as session:
                self.on_parts({p.name: _described(p) for p in part_rows.list_parts(session, self.audit_id)})

    def _settled(self, name: str) -> bool:
        """Whether the pipeline may stop waiting for ``name`` (its entries are in, or it trains it itself)."""
        with session_scope(self.sessions) as session:
            part = next((p for p in part_rows.list_parts(session, self.audit_id) if p.name == name), None)
            status = part.status if part is not None else part_rows.FAILED
            if status != part_rows.DONE:
                if status in part_rows.ENDED:
                    return True  # failed, cancelled or taken: the pipeline trains it
                if not cc.waiting_file(self.root, name).exists():
                    return False  # not needed yet: let its task work
                return part_rows.take_part(session, self.audit_id, name, self.dispatch.worker, self.stale_after)
        self._collect(name)
        return True

    def _collect(self, name: str) -> None:
        """A done part's entries into the local folder, verified on the way in (a bad one is dropped and the
        pipeline trains that control)."""
        sync = ControlCacheSync(self.store(), self.root, self.audit_id, prefix=part_prefix(self.audit_id))
        sync.fetch([self.groups[name]])
        _readable(self.root / self.groups[name])
        log.info("audit %s: positive control %s collected from its task", self.audit_id, name)

    def _drop_pending(self) -> None:
        with self._lock:
            if self.root is not None:
                shutil.rmtree(self.root / cc.PARTS_DIR, ignore_errors=True)
            self.pending.clear()


def _described(part: Any) -> str:
    if part.status in (part_rows.RUNNING, part_rows.DONE, part_rows.TAKEN):
        return f"{part.status} on {part.worker}"
    return part.status


def _readable(folder: Path) -> None:
    """Entries copied in while a sandboxed run reads the folder: a root worker's sandbox runs as another uid, and
    a fetched entry's folder is private (``mkdtemp``), so open it up for reading -- nothing in it is secret."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _has_control(root: Path, group: str) -> bool:
    """A control of ``group`` is already here (from the shared cache or an earlier attempt): no part needed."""
    return any(key.startswith(f"{group}/") and key.endswith("/control") for key in cc.local_entries(root))


def close_parts(sessions: sessionmaker[Session], audit_id: str) -> None:
    """A finished audit's parts that never started will not: ``queued`` -> ``cancelled`` (best effort)."""
    try:
        with session_scope(sessions) as session:
            for part in part_rows.list_parts(session, audit_id):
                if part.status == part_rows.QUEUED:
                    part.status, part.message = part_rows.CANCELLED, "the audit ended before the part started"
    except Exception as exc:  # noqa: BLE001 -- cosmetic: a queued part of a final audit never runs anyway
        log.warning("audit %s: parts not closed: %s", audit_id, exc)


# -- the control task --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartOptions:
    keepalive_s: float = 15.0
    stale_after: timedelta = timedelta(seconds=32)
    keep_work_dir: bool = False


class PartLink:
    """The control task's heartbeat and cancel check, on its part's row (throttled like ``RowLink``)."""

    def __init__(self, sessions: sessionmaker[Session], audit_id: str, name: str, attempt: int, interval_s: float):
        self.sessions, self.audit_id, self.name, self.attempt = sessions, audit_id, name, attempt
        self.interval_s = interval_s
        self.stop_reason = ""
        self._last = float("-inf")

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self.stop_reason and now - self._last >= self.interval_s:
            self._last = now
            try:
                with session_scope(self.sessions) as session:
                    self.stop_reason = part_rows.beat_part(session, self.audit_id, self.name, self.attempt)
            except Exception as exc:  # noqa: BLE001 -- a database blip must not stop a long training run
                log.warning("audit %s: part %s heartbeat skipped: %s", self.audit_id, self.name, exc)
            if self.stop_reason:
                log.info("audit %s: part %s stops: %s", self.audit_id, self.name, self.stop_reason)
        return bool(self.stop_reason)


def execute_control_part(
    audit_id: str, name: str, settings: Settings, *, store: Callable[[], ArtifactStore],
    sessions: sessionmaker[Session], runner: Runner, worker: str,
    download: Callable[[ArtifactStore, str, Path], tuple[Path | None, Path | None]],
    options: PartOptions = PartOptions(),
) -> str | None:
    """Claim, run and publish one control of a split audit; returns the part's final status (None: not ours).

    ``download`` is the executor's ``download_inputs`` (passed in: the executor imports this module).
    """
    attempt = _claim(sessions, audit_id, name, worker, options.stale_after)
    if attempt is None:
        log.info("audit %s: part %s is done, held by a live task, or its audit is over; nothing to do", audit_id, name)
        return None
    work_dir = settings.data_dir / "work" / f"{audit_id}.{name}"
    started = time.monotonic()
    status, message = part_rows.FAILED, None
    try:
        with session_scope(sessions) as session:
            spec = parse_spec(dict(rows.get_audit(session, audit_id).spec))
            rows.record_event(session, audit_id, "part", f"Positive control {name} started on {worker}.",
                              stage="evaluate", data={"part": name, "worker": worker, "attempt": attempt})
        status, message = _run_part(spec, audit_id, name, settings, store, runner, download, work_dir,
                                    PartLink(sessions, audit_id, name, attempt, options.keepalive_s))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"[:2000]
        raise  # the part ends failed (below) and the main task trains the control itself
    finally:
        seconds = time.monotonic() - started
        _finish(sessions, audit_id, name, attempt, status, seconds, message, worker)
        if not options.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return status


def _claim(sessions: sessionmaker[Session], audit_id: str, name: str, worker: str,
           stale_after: timedelta) -> int | None:
    """Claim the part; a part ``running`` on a frozen heartbeat (a redelivered message) is claimed once it is stale."""
    deadline = time.monotonic() + stale_after.total_seconds() + 2.0
    while True:
        try:
            with session_scope(sessions) as session:
                attempt = part_rows.claim_part(session, audit_id, name, worker, stale_after)
                running = any(p.name == name and p.status == part_rows.RUNNING
                              for p in part_rows.list_parts(session, audit_id))
        except rows.AuditNotFound:
            return None
        if attempt is not None or not running or time.monotonic() > deadline:
            return attempt
        time.sleep(min(2.0, stale_after.total_seconds() / 4))


def _run_part(spec: AuditSpec, audit_id: str, name: str, settings: Settings, store: Callable[[], ArtifactStore],
              runner: Runner, download: Callable[..., tuple[Path | None, Path | None]], work_dir: Path,
              link: PartLink) -> tuple[str, str | None]:
    model_path, dataset_path = download(store(), audit_id, work_dir)
    inputs = AuditInputs(
        work_dir=work_dir, model_path=model_path, dataset_path=dataset_path, allowed_hosts=settings.allowed_hosts,
        audit_id=audit_id, device=settings.device, fmnist_dir=settings.fmnist_dir, cache_dir=settings.data_dir,
        control_cache=work_dir / LOCAL_DIR,
    )
    group = planned_control_groups(spec, inputs).get(name)
    if group is None:
        return part_rows.FAILED, "the control cannot be cached for this audit"
    result = runner(spec, replace(inputs, only_control=name), lambda *_: None, link.should_cancel, None)
    if result.status != "succeeded":
        error = result.error or {}
        status = part_rows.CANCELLED if result.status == "cancelled" else part_rows.FAILED
        return status, error.get("message") or link.stop_reason or result.status
    sync = ControlCacheSync(store(), inputs.control_cache, audit_id, prefix=part_prefix(audit_id))
    sync.groups = {group}  # the only group this task may write: its own control's
    published = sync.publish()
    if not any(key.endswith("/control") for key in published):
        return part_rows.FAILED, "the control's entries did not verify"
    return part_rows.DONE, None


def _finish(sessions: sessionmaker[Session], audit_id: str, name: str, attempt: int, status: str, seconds: float,
            message: str | None, worker: str) -> None:
    try:
        with session_scope(sessions) as session:
            if part_rows.finish_part(session, audit_id, name, attempt, status, seconds=seconds, message=message):
                rows.record_event(session, audit_id, "part",
                                  f"Positive control {name}: {status} on {worker} after {seconds:.0f} s.",
                                  stage="evaluate", data={"part": name, "worker": worker, "status": status,
                                                          "seconds": round(seconds, 1)})
    except Exception as exc:  # noqa: BLE001 -- the main task takes a part whose heartbeat stops
        log.warning("audit %s: part %s outcome not recorded: %s", audit_id, name, exc)
