"""REFINE checkpoints that outlive the machine: mirrored to the artifact store while an audit runs.

The trainer writes one checkpoint per epoch into ``work_dir/refine/`` (atomically:
a temporary file, then a rename) and resumes exactly from it. A retry after a lost
worker may land on another machine, whose work dir is empty, so the executor's
keep-alive thread copies new or changed files to ``audits/{id}/checkpoints/`` and a
retried run restores the missing ones before the pipeline starts. The copies go once
the audit is final.

A file is uploaded from a hard link taken first: the trainer may rename a newer
epoch over it mid-upload, and the link keeps the bytes being uploaded consistent.

The mirror is closed before the audit's copies are deleted: an upload still in
flight on the keep-alive thread (a slow store, a busy machine) would otherwise land
after the deletion and stay behind for good. ``close`` waits for it, and no sync
uploads anything after.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from auditor.store.artifacts import ArtifactStore, checkpoint_prefix

log = logging.getLogger(__name__)

#: Suffixes of files still being written (``auditor.runtime.save_atomically``).
PARTIAL_SUFFIXES = (".part",)

#: How long ``close`` waits for an upload in flight: longer than one S3 attempt's connect and read timeouts.
CLOSE_TIMEOUT_S = 180.0


def discard_checkpoints(store: ArtifactStore, audit_id: str) -> int:
    """Delete an audit's stored checkpoints (it is final); returns how many there were."""
    return store.delete_prefix(checkpoint_prefix(audit_id))


class CheckpointMirror:
    """Keeps ``audits/{id}/checkpoints/`` in step with the files of one local folder."""

    def __init__(self, store: Callable[[], ArtifactStore], audit_id: str, folder: Path):
        self._store = store  # a factory: building an S3 store already talks to S3
        self.prefix = checkpoint_prefix(audit_id)
        self.folder = folder
        self._synced: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) last uploaded
        self._uploading = threading.Lock()  # held by a sync for as long as it may upload
        self._closed = False

    def restore(self) -> list[str]:
        """Download the stored files this machine lacks; returns their names."""
        restored = []
        for key in self._store().list(self.prefix):
            name = key.removeprefix(self.prefix)
            target = self.folder / PurePosixPath(name)
            if "/" in name or target.exists():  # only the folder's own files; a local copy is at least as new
                continue
            self._store().download_to(key, target)
            self._synced[name] = _signature(target)
            restored.append(name)
        return restored

    def sync(self) -> list[str]:
        """Upload new or changed files; returns their names. Cheap when nothing changed; nothing once closed."""
        with self._uploading:
            return [] if self._closed else self._upload_changed()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """No upload after this returns True: waits for one in flight. False: it outlasted ``timeout_s``."""
        if not self._uploading.acquire(timeout=timeout_s):
            log.warning("checkpoint upload to %s still running after %.0f s", self.prefix, timeout_s)
            self._closed = True  # the running sync finishes its files; later ones upload nothing
            return False
        self._closed = True
        self._uploading.release()
        return True

    def _upload_changed(self) -> list[str]:
        uploaded = []
        for path in self._files():
            if self._synced.get(path.name) == _signature(path):
                continue
            with tempfile.TemporaryDirectory(dir=self.folder.parent, prefix=".sync-") as scratch:
                pinned = Path(scratch) / path.name
                os.link(path, pinned)
                self._store().put(self.prefix + path.name, pinned)
                self._synced[path.name] = _signature(pinned)
            uploaded.append(path.name)
        return uploaded

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.endswith(PARTIAL_SUFFIXES))


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size
