"""Device choice, seeding and the progress/cancel callback types shared by all stages."""

from __future__ import annotations

import os
import random
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


def resolve_device(preference: str | None = None) -> torch.device:
    """``auto`` picks CUDA when present; ``REFINE_AUDIT_DEVICE`` is the default preference."""
    choice = (preference or os.environ.get("REFINE_AUDIT_DEVICE") or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("REFINE_AUDIT_DEVICE=cuda but no CUDA device is available")
    if choice not in {"cpu", "cuda"}:
        raise ValueError(f"REFINE_AUDIT_DEVICE must be auto, cpu or cuda, not {choice!r}")
    return torch.device(choice)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

