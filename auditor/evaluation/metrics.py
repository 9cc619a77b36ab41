"""BA, ASR, RA, agreement and confusion, defined once (REFINE.md) and used everywhere.

All functions take predicted labels, so the same code scores a local model, a
defended model and a remote API; nothing drops a partial batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from auditor.data import ImageSet

#: float [0, 1] batch (N, C, H, W) -> predicted labels (N,)
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackMetrics:
    ba: float  # accuracy on the clean labelled test set
    asr: float  # triggered non-target images classified as the target
    ra: float  # triggered non-target images classified as their true class

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def predict_labels(predict: Predictor, data: ImageSet, batch_size: int = 512) -> torch.Tensor:
    outs = [predict(xb).cpu() for xb, _ in data.batches(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, dtype=torch.long)


def model_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """argmax of a local model on the device, in eval mode and without gradients."""
    model.eval()

    @torch.no_grad()
    def predict(xb: torch.Tensor) -> torch.Tensor:
        return model(xb.to(device)).argmax(1)

    return predict


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (pred == labels).float().mean().item()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of inputs on which two models give the same top-1 class."""
    return accuracy(a, b)


def asr_and_ra(pred_triggered: torch.Tensor, labels: torch.Tensor, target: int) -> tuple[float, float]:
    """Both over triggered images whose true class is not the target (the usual denominator bug avoided)."""
    keep = labels != target
    if not keep.any():
        raise ValueError("every test image is of the target class; ASR is undefined")
    pred, true = pred_triggered[keep], labels[keep]
    return (pred == target).float().mean().item(), (pred == true).float().mean().item()


def attack_metrics(predict: Predictor, clean: ImageSet, triggered: ImageSet, target: int) -> AttackMetrics:
    assert clean.y is not None and triggered.y is not None, "attack metrics need labels"
    ba = accuracy(predict_labels(predict, clean), clean.y)
    asr, ra = asr_and_ra(predict_labels(predict, triggered), triggered.y, target)
    return AttackMetrics(ba=ba, asr=asr, ra=ra)


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """None for a class absent from the labels rather than a misleading 0."""
    matrix = confusion(pred, labels, num_classes)
    totals = matrix.sum(1)
    return [None if totals[k] == 0 else (matrix[k, k] / totals[k]).item() for k in range(num_classes)]
