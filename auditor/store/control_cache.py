"""The positive-control cache in the artifact store: fetched for an audit before it runs, published after.

The pipeline reads and writes cached controls in a local folder (``auditor/pipeline/cache.py``);
a sandboxed audit has no network, so it cannot reach S3 itself. The trusted side (the
worker's executor, the CLI) therefore

1. computes the group key of every planned control from the spec, the plan and the
   data's digest -- before any model is loaded -- and copies the entries under those
   groups from the store (``control-cache/v1/<group>/...``) into the audit's
   ``work_dir/control-cache``, checking every file against its manifest: an entry that
   fails (tampered, truncated, incomplete) is logged, deleted from the store and not
   copied, so the audit trains that control again;
2. runs the audit with that folder (bound writable into the sandbox);
3. publishes the entries the audit added: only under this audit's groups, only after
   they verify again here (files against manifest, every payload a parsable
   safetensors file), payload first and manifest last (an entry without a manifest is
   never read), with the provenance (audit id, time) set here rather than taken from
   the child.

Nothing here may fail an audit: a store that is down means controls are trained, as
without a cache.

What hashes cannot prove is that a well-formed entry was trained honestly. The
pipeline re-scores every reused control on the audit's own images, so no reported
figure is copied from the cache; but a sandbox taken over by a hostile model could
publish bogus weights under its own audit's keys (a REFINE transform that blanks every
image "removes" a backdoor, visible only as the control's collapsed BA). Publishing is
therefore confined to the groups the trusted side planned for that audit, and
provenance is stamped here, and only audits of weights-only checkpoints (safetensors,
state dicts) or of model APIs publish at all: a TorchScript or ``torch.export`` model
carries a program, so its audit reuses the cache but never feeds it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from auditor.models.containers import inspect_checkpoint
from auditor.pipeline import cache as cc
from auditor.store.artifacts import ArtifactStore, audit_prefix

log = logging.getLogger(__name__)

LOCAL_DIR = "control-cache"  # under the audit's work dir


class ControlCacheSync:
    """One audit's traffic between the artifact store and its local cache folder."""

    def __init__(self, store: ArtifactStore, root: Path, audit_id: str, prefix: str = cc.STORE_PREFIX):
        self.store = store
        self.prefix = prefix  # the shared cache, or one split audit's own entries (``part_prefix``)
        self.root = Path(root)
        self.audit_id = audit_id
        self.groups: set[str] = set()
        self.fetched: dict[str, str] = {}  # key -> sha256 of the manifest copied in (unchanged entries stay put)

    # -- before the run ---------------------------------------------------------------------------------------------

    def fetch(self, groups: Iterable[str]) -> list[str]:
        """Copy every verified entry of ``groups`` into the local folder; returns their keys."""
        self.root.mkdir(parents=True, exist_ok=True)
        for group in groups:
            if not cc.GROUP_PATTERN.match(group):
                continue
            self.groups.add(group)
            names = self.store.list(f"{self.prefix}{group}/")
            entries: dict[str, set[str]] = {}
            for name in names:
                key, _, file = name.removeprefix(self.prefix).rpartition("/")
                if cc.KEY_PATTERN.match(key):
                    entries.setdefault(key, set()).add(file)
            for key, files in sorted(entries.items()):
                if cc.MANIFEST in files:  # no manifest: an upload in progress, or an interrupted one
                    self._fetch_entry(key)
        return sorted(self.fetched)

    def _fetch_entry(self, key: str) -> None:
        target = self.root.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
        try:
            manifest = self.store.get_bytes(self._key(key, cc.MANIFEST))
            if len(manifest) > cc.MAX_MANIFEST_BYTES:
                raise cc.InvalidEntry("the manifest is too large")
            (staging / cc.MANIFEST).write_bytes(manifest)
            for name in cc.ENTRY_FILES[cc.kind_of(key)]:
                self.store.download_to(self._key(key, name), staging / name)
            cc.verify_entry(staging, key)
        except cc.InvalidEntry as exc:
            self._discard(key, str(exc))
            shutil.rmtree(staging, ignore_errors=True)
            return
        except FileNotFoundError as exc:  # ArtifactNotFound: a payload file is gone
            self._discard(key, f"a file is missing ({exc})")
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        self.fetched[key] = hashlib.sha256(manifest).hexdigest()

    def _discard(self, key: str, reason: str) -> None:
        log.warning("audit %s: control cache entry %s failed verification (%s); deleted from the store, it will be "
                    "rebuilt", self.audit_id, key, reason)
        self.store.delete_prefix(f"{self.prefix}{key}/")

    # -- after the run ----------------------------------------------------------------------------------------------

    def publish(self) -> list[str]:
        """Upload the entries the audit wrote under its own groups, each verified here first; returns their keys."""
        published = []
        for key in cc.local_entries(self.root):
            path = self.root.joinpath(*key.split("/"))
            if key.split("/", 1)[0] not in self.groups:
                log.warning("audit %s: control cache entry %s is outside the audit's groups; not published",
                            self.audit_id, key)
                continue
            try:
                manifest = cc.verify_entry(path, key)
                _check_safetensors(path, manifest)
            except cc.InvalidEntry as exc:
                log.warning("audit %s: control cache entry %s not published (%s)", self.audit_id, key, exc)
                continue
            raw = (path / cc.MANIFEST).read_bytes()
            if self.fetched.get(key) == hashlib.sha256(raw).hexdigest():
                continue  # reused as fetched
            try:
                self._upload(key, path, manifest)
            except cc.InvalidEntry as exc:
                log.warning("audit %s: control cache entry %s not published (%s)", self.audit_id, key, exc)
                continue
            published.append(key)
        return published

    def _upload(self, key: str, path: Path, manifest: dict[str, Any]) -> None:
        for name, recorded in manifest["files"].items():
            info = self.store.put(self._key(key, name), path / name)
            if info.sha256 != recorded["sha256"] or info.size != recorded["size"]:
                raise cc.InvalidEntry(f"{name} changed while it was uploaded")
        manifest = {**manifest, "created_by": {"audit_id": self.audit_id,
                                               "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}}
        self.store.put(self._key(key, cc.MANIFEST), json.dumps(manifest, indent=2).encode(), "application/json")
        log.info("audit %s: control cache entry %s published", self.audit_id, key)

    def _key(self, key: str, name: str) -> str:
        return f"{self.prefix}{key}/{name}"


def part_prefix(audit_id: str) -> str:
    """Where the control tasks of a split audit leave their entries for its main task (``worker/parts.py``).

    Per audit, not the shared cache: every audit can split, including those whose entries
    must never feed other audits (``may_publish``); the main task publishes what it may.
    The folder goes with the audit's other files.
    """
    return f"{audit_prefix(audit_id)}control-parts/"


def _check_safetensors(path: Path, manifest: dict[str, Any]) -> None:
    """Every payload is a safetensors file of tensors (its header parses; nothing in it can run)."""
    from safetensors import safe_open

    for name in manifest["files"]:
        try:
            with safe_open(str(path / name), framework="pt") as handle:
                if not list(handle.keys()):
                    raise cc.InvalidEntry(f"{name} holds no tensors")
        except cc.InvalidEntry:
            raise
        except Exception as exc:  # noqa: BLE001 -- whatever the parser says, the file is not ours
            raise cc.InvalidEntry(f"{name} is not a safetensors file ({exc})") from None


def planned_groups(spec: Any, inputs: Any) -> list[str]:
    """The group keys of the audit's planned controls, as the pipeline will compute them (none if unplannable)."""
    return sorted(set(planned_control_groups(spec, inputs).values()))


def planned_control_groups(spec: Any, inputs: Any) -> dict[str, str]:
    """Each planned control's group key (none when the audit cannot be planned or its controls cached)."""
    from auditor.errors import AuditError
    from auditor.pipeline.data import data_summary
    from auditor.pipeline.plan import plan_audit
    from auditor.runtime import resolve_device

    try:
        summary = data_summary(spec, inputs.dataset_path)
        plan = plan_audit(spec, summary, device=resolve_device(inputs.device))
    except (AuditError, ValueError, OSError):
        return {}  # the audit reports its own error
    digest = cc.data_digest(spec, inputs.dataset_path, inputs.fmnist_dir)
    return cc.control_groups(spec, plan, digest, summary.labelled)


#: Checkpoint formats that are weights only: loading them runs none of the submitter's code.
CODE_FREE_FORMATS = frozenset({"safetensors", "state_dict"})


def may_publish(inputs: Any) -> bool:
    """Only a sandbox that ran no submitted code may publish controls for other audits.

    TorchScript and ``torch.export`` archives carry a program; were one to take over its
    sandbox, it could write well-formed but dishonest controls. Audits of such models
    still reuse the cache, they just never feed it. Audits of a model API load no model.
    """
    model_path = getattr(inputs, "model_path", None)
    if model_path is None:
        return True
    try:
        return inspect_checkpoint(model_path).format in CODE_FREE_FORMATS
    except Exception:  # noqa: BLE001 -- a file the checks refuse publishes nothing
        return False


def run_with_control_cache(
    runner: Callable[..., Any],
    store: ArtifactStore,
    spec: Any,
    inputs: Any,
    on_progress: Callable[[str, int, int], None] = lambda *_: None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_metrics: Callable[[str, dict[str, Any]], None] | None = None,
) -> Any:
    """``runner`` (``run_audit`` or its sandboxed twin) with the cached controls fetched before and published after."""
    sync = ControlCacheSync(store, Path(inputs.work_dir) / LOCAL_DIR, inputs.audit_id)
    try:
        fetched = sync.fetch(planned_groups(spec, inputs))
        if fetched:
            log.info("audit %s: %d cached control entries fetched", inputs.audit_id, len(fetched))
    except Exception as exc:  # noqa: BLE001 -- without the cache the controls are trained, as before
        log.warning("audit %s: control cache not fetched (%s); controls will be trained", inputs.audit_id, exc)
    try:
        return runner(spec, replace(inputs, control_cache=sync.root), on_progress, should_cancel, on_metrics)
    finally:
        try:
            if may_publish(inputs):
                sync.publish()
            else:
                log.info("audit %s: the submitted model carries code; its sandbox's control entries are not "
                         "published", inputs.audit_id)
        except Exception as exc:  # noqa: BLE001 -- the audit's outcome matters more than the cache
            log.warning("audit %s: control cache not published (%s)", inputs.audit_id, exc)
        shutil.rmtree(sync.root, ignore_errors=True)
