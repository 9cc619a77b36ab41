"""The REFINE checkpoint mirror: what it uploads, restores, and never uploads after it is closed."""

from __future__ import annotations

import threading
from pathlib import Path

from auditor.store.artifacts import DEFAULT_CONTENT_TYPE, LocalStore, ObjectInfo, Source, checkpoint_prefix
from worker.checkpoints import CheckpointMirror, discard_checkpoints

AUDIT = "a1"


class GatedStore(LocalStore):
    """A store whose uploads wait at a gate: a slow S3 under a busy machine, on demand."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.gate = threading.Event()
        self.uploading = threading.Event()

    def put(self, key: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> ObjectInfo:
        self.uploading.set()
        self.gate.wait(timeout=30)
        return super().put(key, source, content_type)


def test_a_second_machine_restores_what_the_first_mirrored(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first, second = tmp_path / "a" / "refine", tmp_path / "b" / "refine"
    first.mkdir(parents=True)
    (first / "refine_checkpoint.pt").write_bytes(b"epoch 3")
    (first / "refine_checkpoint.pt.part").write_bytes(b"half-written")

    assert CheckpointMirror(lambda: store, AUDIT, first).sync() == ["refine_checkpoint.pt"]
    assert CheckpointMirror(lambda: store, AUDIT, second).restore() == ["refine_checkpoint.pt"]
    assert (second / "refine_checkpoint.pt").read_bytes() == b"epoch 3"
    assert discard_checkpoints(store, AUDIT) == 1 and store.list(checkpoint_prefix(AUDIT)) == []


def _upload_in_flight(tmp_path: Path) -> tuple[GatedStore, Path, CheckpointMirror, threading.Thread]:
    """A mirror whose keep-alive thread is in the middle of uploading a checkpoint, held at the store's gate."""
    store = GatedStore(tmp_path / "store")
    folder = tmp_path / "refine"
    folder.mkdir()
    (folder / "refine_checkpoint.pt").write_bytes(b"epoch 8")
    mirror = CheckpointMirror(lambda: store, AUDIT, folder)
    keepalive = threading.Thread(target=mirror.sync)  # the keep-alive thread's last chore
    keepalive.start()
    assert store.uploading.wait(timeout=10)
    return store, folder, mirror, keepalive


def test_closing_waits_for_the_upload_in_flight_so_the_cleanup_leaves_nothing_behind(tmp_path: Path) -> None:
    store, folder, mirror, keepalive = _upload_in_flight(tmp_path)

    closing = threading.Thread(target=mirror.close)
    closing.start()
    closing.join(timeout=0.5)
    assert closing.is_alive()  # the upload is still in flight: close waits for it
    store.gate.set()
    closing.join(timeout=10)
    keepalive.join(timeout=10)
    assert not closing.is_alive() and not keepalive.is_alive()

    assert discard_checkpoints(store, AUDIT) == 1  # the cleanup, after close
    (folder / "refine_checkpoint.pt").write_bytes(b"epoch 9, written by a straggler")
    assert mirror.sync() == []
    assert store.list(checkpoint_prefix(AUDIT)) == []


def test_an_upload_that_outlasts_the_wait_is_reported_and_no_later_sync_uploads(tmp_path: Path) -> None:
    store, folder, mirror, stuck = _upload_in_flight(tmp_path)

    assert mirror.close(timeout_s=0.2) is False
    store.gate.set()
    stuck.join(timeout=10)
    (folder / "late.pt").write_bytes(b"later")
    assert mirror.sync() == []
    assert store.list(checkpoint_prefix(AUDIT)) == [checkpoint_prefix(AUDIT) + "refine_checkpoint.pt"]
