"""Positive controls reused, not retrained: a content-addressed cache of control models and their REFINE results.

A control is our own model, trained by our own code on the audit's data, so two
audits that would train the same control can share it. An entry is addressed by
everything the trained weights depend on, hashed:

* **group** (computable from the spec, the plan and the data's digest, before
  anything is loaded -- what the trusted side fetches for a sandboxed audit): the
  data digest and how the pool is cut from it, the attack with its resolved
  parameters, the control training settings with the stopping rule (held-out
  split, check interval, ASR and BA thresholds), the seed, bf16, the device type,
  and the software (package version, torch version, ``CACHE_FORMAT``);
* **architecture** fingerprint of the control model (its ``ArchConfig``; the
  normalisation is measured on the pool, so only the pipeline knows it);
* **REFINE** settings, for the defense trained around the control (a second entry
  beside the control's: same control, other REFINE settings -> only REFINE retrains).

Keys are paths: ``<group>/<arch>/control`` and ``<group>/<arch>/refine-<settings>``.
Each entry is a folder of payload files (safetensors only: weights, never pickles)
and ``manifest.json``, which records the sha256 and size of every payload file, the
inputs behind the key, and the provenance (audit id, time). Every read checks the
files against the manifest; an entry that fails (tampered, truncated, a file
missing, weights that do not fit) is logged, deleted and rebuilt, never used. The
cached numbers are never reported either: a reused control is re-scored on this
audit's test images (the costly part, training, is what is saved).

This module works on a local folder. In the service the trusted side copies the
candidate entries from the artifact store into the audit's work dir before the run
and publishes new ones after it (``auditor/store/control_cache.py``), so a
sandboxed audit needs no network.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from auditor.attacks import AttackConfig
from auditor.attacks.catalog import build_attack
from auditor.models.checkpoints import sha256_file

if TYPE_CHECKING:
    from auditor.models import ArchConfig
    from auditor.pipeline.plan import AuditPlan, ControlsPlan
    from auditor.refine import RefineConfig
    from auditor.spec import AuditSpec

log = logging.getLogger(__name__)

#: Bump when the entry layout or the meaning of a key changes: older entries are then never read.
CACHE_FORMAT = 1
#: Where entries live in the artifact store (and under a local cache root): ``control-cache/v1/<key>/``.
STORE_PREFIX = f"control-cache/v{CACHE_FORMAT}/"
MANIFEST = "manifest.json"
#: The payload files of each kind of entry; nothing else is read, uploaded or downloaded.
ENTRY_FILES = {"control": ("model.safetensors",), "refine": ("transform.safetensors",)}
MAX_MANIFEST_BYTES = 256 << 10
MAX_PAYLOAD_BYTES = 2 << 30
_HEX32 = "[0-9a-f]{32}"
KEY_PATTERN = re.compile(rf"^{_HEX32}/{_HEX32}/(control|refine-{_HEX32})$")
GROUP_PATTERN = re.compile(rf"^{_HEX32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class InvalidEntry(ValueError):
    """A cache entry that must not be used; the message says why (it goes to the log and the report)."""


def kind_of(key: str) -> str:
    """``control`` or ``refine``, from a key's last segment."""
    return "control" if key.endswith("/control") else "refine"


def digest(value: Any) -> str:
    """128 bits of sha256 over canonical JSON: enough to never collide by chance, short enough for paths."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- keys ----------------------------------------------------------------------------------------------------------


def data_digest(spec: AuditSpec, dataset_path: Path | None, fmnist_dir: Path) -> str | None:
    """sha256 of the data an audit reads (the built-in files, or the upload); None when it cannot be read."""
    try:
        if spec.data.source == "fashion-mnist":
            from auditor.data.datasets import fashion_mnist_files

            return digest([_file_sha256(p) for p in fashion_mnist_files(fmnist_dir)])
        return _file_sha256(Path(dataset_path)) if dataset_path is not None else None
    except (OSError, ValueError, TypeError) as exc:
        log.info("control cache: the data cannot be digested (%s); controls will be trained", exc)
        return None
    except Exception as exc:  # noqa: BLE001 -- a missing data set is the data stage's error to report
        log.info("control cache: no data digest (%s)", exc)
        return None


def _file_sha256(path: Path) -> str:
    stats = path.stat()
    return _cached_sha256(str(path.resolve()), stats.st_size, stats.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The built-in data set is hashed once per process, not once per audit."""
    return sha256_file(Path(path))


def group_inputs(spec: AuditSpec, plan: AuditPlan, data_sha256: str, attack: str) -> dict[str, Any]:
    """Everything a control depends on that the plan already knows (the module docstring's group)."""
    from auditor import __version__
    from auditor.training import TrainConfig

    c = plan.controls
    resolved = build_attack(AttackConfig(attack, target=c.target, seed=spec.seed), plan.data.image_shape).config
    return {
        "format": CACHE_FORMAT, "refine_audit": __version__, "torch": torch.__version__,
        "data": {"sha256": data_sha256, "source": spec.data.source, "pool_images": plan.data.pool_images,
                 "test_fraction": spec.data.test_fraction if spec.data.source == "upload" else None,
                 "image_shape": list(plan.data.image_shape), "num_classes": plan.data.num_classes},
        "attack": resolved.to_dict(),
        "training": {**asdict(TrainConfig(epochs=c.epochs, bf16=plan.bf16, batch_size=c.batch_size)),
                     "train_images": c.train_images, "device": plan.device, "stop": stop_inputs(c)},
        "seed": spec.seed,
    }


def stop_inputs(c: ControlsPlan) -> dict[str, Any]:
    """The stopping rule, part of the key: the same cap stopped by another rule is another model."""
    return {"rule": c.stop_rule, "holdout_images": c.holdout_images, "check_every": c.check_every,
            "min_asr": c.min_asr, "ba_tolerance": c.ba_tolerance, "cooldown_share": c.cooldown_share}


def control_groups(spec: AuditSpec, plan: AuditPlan, data_sha256: str | None, labelled: bool) -> dict[str, str]:
    """The group key of each planned control; none when controls cannot be cached (unknown data, or
    pseudo-labels: a control trained on the submitted model's own answers depends on that model)."""
    if data_sha256 is None or not labelled:
        return {}
    return {name: digest(group_inputs(spec, plan, data_sha256, name)) for name in plan.controls.attacks}


def control_key(group: str, arch: ArchConfig) -> str:
    return f"{group}/{digest(arch.to_dict())}/control"


def refine_key(control: str, config: RefineConfig, num_classes: int, seed: int) -> str:
    """Beside its control: the same control defended with other REFINE settings is another entry."""
    return f"{control.removesuffix('/control')}/refine-{digest([config.to_dict(), num_classes, seed])}"


# -- entries -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A verified entry: its folder, manifest and key."""

    key: str
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def provenance(self) -> dict[str, Any]:
        created = self.manifest.get("created_by") or {}
        return {"audit_id": str(created.get("audit_id", ""))[:128], "created_at": str(created.get("created_at", ""))[:64]}


def verify_entry(path: Path, key: str) -> dict[str, Any]:
    """The entry's manifest, once every payload file matches it; ``InvalidEntry`` otherwise."""
    if not KEY_PATTERN.match(key):
        raise InvalidEntry(f"malformed key {key!r}")
    manifest = _read_manifest(path / MANIFEST)
    kind = kind_of(key)
    if manifest.get("format") != CACHE_FORMAT or manifest.get("kind") != kind or manifest.get("key") != key:
        raise InvalidEntry("the manifest belongs to another key, kind or format")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(ENTRY_FILES[kind]):
        raise InvalidEntry(f"the manifest must list exactly {list(ENTRY_FILES[kind])}")
    for name, recorded in files.items():
        _check_file(path / name, recorded)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    _regular(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEntry(f"{MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise InvalidEntry(f"{MANIFEST} is not an object")
    return manifest


def _regular(path: Path, limit: int) -> int:
    try:
        mode = os.lstat(path)
    except OSError:
        raise InvalidEntry(f"{path.name} is missing") from None
    if not stat.S_ISREG(mode.st_mode):
        raise InvalidEntry(f"{path.name} is not a regular file")
    if mode.st_size > limit:
        raise InvalidEntry(f"{path.name} is larger than {limit} bytes")
    return mode.st_size


def _check_file(path: Path, recorded: Any) -> None:
    if not isinstance(recorded, dict) or not _SHA256.match(str(recorded.get("sha256", ""))) \
            or not isinstance(recorded.get("size"), int):
        raise InvalidEntry(f"the manifest's record of {path.name} is malformed")
    size = _regular(path, MAX_PAYLOAD_BYTES)
    if size != recorded["size"]:
        raise InvalidEntry(f"{path.name} has {size} bytes, the manifest says {recorded['size']} (truncated?)")
    actual = sha256_file(path)
    if actual != recorded["sha256"]:
        raise InvalidEntry(f"{path.name} has sha256 {actual[:12]}..., the manifest says {recorded['sha256'][:12]}...")


def file_record(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    return {"sha256": sha256_file(path), "size": size}


class ControlCache:
    """A local folder of entries: ``root/<key>/``. Reads verify, writes are atomic (a temp folder renamed)."""

    def __init__(self, root: Path, audit_id: str):
        self.root = Path(root)
        self.audit_id = audit_id
        self.rejected: dict[str, str] = {}  # key -> why its entry was discarded during this audit

    def entry_dir(self, key: str) -> Path:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"malformed control-cache key {key!r}")
        return self.root.joinpath(*key.split("/"))

    def read(self, key: str) -> Entry | None:
        """The verified entry, or None (missing, or found invalid: then logged, deleted and remembered)."""
        path = self.entry_dir(key)
        if not path.exists():
            return None
        try:
            return Entry(key, path, verify_entry(path, key))
        except InvalidEntry as exc:
            self.discard(key, str(exc))
            return None

    def discard(self, key: str, reason: str) -> None:
        """An entry that must not be used: logged, deleted, and rebuilt by the caller."""
        log.warning("control cache: entry %s rejected (%s); discarded, it will be rebuilt", key, reason)
        self.rejected[key] = reason
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)

    def write(self, key: str, files: dict[str, Path], inputs: dict[str, Any], info: dict[str, Any]) -> Entry | None:
        """Copy ``files`` into a new entry with its manifest; best effort (a full disk must not fail the audit)."""
        target = self.entry_dir(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
            for name, source in files.items():
                shutil.copyfile(source, staging / name)
            manifest = {
                "format": CACHE_FORMAT, "kind": kind_of(key), "key": key,
                "files": {name: file_record(staging / name) for name in files},
                "created_by": {"audit_id": self.audit_id,
                               "created_at": dt.datetime.now(dt.timezone.utc).isoformat()},
                "inputs": inputs, **info,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except OSError as exc:
            log.warning("control cache: entry %s not written (%s)", key, exc)
            return None
        log.info("control cache: stored %s", key)
        return Entry(key, target, manifest)


#: Beside the entries in a local cache folder, one file per control another task of the same audit is training:
#: ``parts/<attack>.pending`` while the trusted side expects that task's entries (it removes the file once they are
#: copied in, or once it takes the control back), ``parts/<attack>.waiting`` once the pipeline needs the control.
PARTS_DIR = "parts"


def pending_file(root: Path, attack: str) -> Path:
    return Path(root) / PARTS_DIR / f"{attack}.pending"


def waiting_file(root: Path, attack: str) -> Path:
    return Path(root) / PARTS_DIR / f"{attack}.waiting"


def local_entries(root: Path) -> list[str]:
    """Keys of the entry folders under ``root`` (any with a manifest; verification is the reader's job)."""
    root = Path(root)
    keys = []
    for manifest in root.glob(f"*/*/*/{MANIFEST}"):
        key = manifest.parent.relative_to(root).as_posix()
        if KEY_PATTERN.match(key):
            keys.append(key)
    return sorted(keys)
