"""Architectures, the REFINE U-Net, and safe checkpoint loading."""

from auditor.models.architectures import ArchConfig, Classifier, UNet, UNetConfig, build_classifier
from auditor.models.checkpoints import LoadedModel, export_torchscript, load_checkpoint, save_classifier

__all__ = [
    "ArchConfig",
    "Classifier",
    "LoadedModel",
    "UNet",
    "UNetConfig",
    "build_classifier",
    "export_torchscript",
    "load_checkpoint",
    "save_classifier",
]
