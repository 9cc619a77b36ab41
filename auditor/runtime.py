"""Device choice, seeding and the progress/cancel callback types shared by all stages."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from auditor.errors import AuditCancelled

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


def no_progress(stage: str, done: int, total: int) -> None:
    """Default progress sink for callers that do not watch."""


def never_cancel() -> bool:
    return False


def check_cancel(should_cancel: CancelFn) -> None:
    """Raise ``AuditCancelled`` when asked; called between batches so a stop is at most one batch late."""
    if should_cancel():
        raise AuditCancelled()


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; callers pass ``Settings.device`` (``REFINE_AUDIT_DEVICE``) or a flag."""
    choice = (preference or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("REFINE_AUDIT_DEVICE=cuda but no CUDA device is available")
    if choice not in {"cpu", "cuda"}:
        raise ValueError(f"REFINE_AUDIT_DEVICE must be auto, cpu or cuda, not {choice!r}")
    return torch.device(choice)


def cpu_bf16_pays(device: torch.device) -> bool:
    """Whether to autocast to bf16 by default: only on CPUs that compute it natively.

    With avx512_bf16 (or AMX) it roughly doubles the U-Net's training speed; without
    it PyTorch emulates bf16, and on an AMD EPYC without the flag one small-CNN
    training step took 1.35 s against 0.19 s in fp32 (7x slower).
    """
    return device.type == "cpu" and _cpu_has_native_bf16()


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def save_atomically(payload: object, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a torn file to resume from."""
    tmp = path.with_name(path.name + ".part")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

