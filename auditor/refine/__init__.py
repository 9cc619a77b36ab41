"""REFINE: a trained input transformation T and a fixed label derangement M around a frozen model."""

from auditor.refine.config import RefineConfig
from auditor.refine.defended import DefendedModel, inference_transform
from auditor.refine.export import ExportedModel, export_defended, export_defended_formats
from auditor.refine.remap import derangement, inverse, remap_probabilities
from auditor.refine.trainer import CHECKPOINT_NAME, RefineResult, train_refine

__all__ = [
    "CHECKPOINT_NAME",
    "DefendedModel",
    "ExportedModel",
    "RefineConfig",
    "RefineResult",
    "derangement",
    "export_defended",
    "export_defended_formats",
    "inference_transform",
    "inverse",
    "remap_probabilities",
    "train_refine",
]
