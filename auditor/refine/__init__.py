"""REFINE: a trained input transformation T and a fixed label derangement M around a frozen model."""

from auditor.refine.config import RefineConfig
from auditor.refine.defended import DefendedModel, export_defended
from auditor.refine.remap import derangement, inverse, remap_probabilities
from auditor.refine.trainer import CHECKPOINT_NAME, RefineResult, train_refine

__all__ = [
    "CHECKPOINT_NAME",
    "DefendedModel",
    "RefineConfig",
    "RefineResult",
    "derangement",
    "export_defended",
    "inverse",
    "remap_probabilities",
    "train_refine",
]
