"""The defended model M o softmax o f o T as one module, and its export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from auditor.refine.remap import inverse


class DefendedModel(nn.Module):
    """Drop-in replacement for f: same input space ([0, 1] images) and label space.

    Returns log-probabilities of the remapped distribution, so ``argmax`` is the
    defended label and ``exp`` the defended probabilities.
    """

    def __init__(self, transform: nn.Module, model: nn.Module, mapping: torch.Tensor):
        super().__init__()
        self.transform = transform
        self.model = model
        self.register_buffer("mapping", mapping.clone().long())
        self.register_buffer("inverse_mapping", inverse(mapping).long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.transform(x))
        return torch.log_softmax(logits.float(), dim=1).index_select(1, self.inverse_mapping)


def export_defended(defended: DefendedModel, example: torch.Tensor, path: str | Path) -> Path:
    """TorchScript archive with T, f and M inside; loads with ``torch.jit.load`` anywhere, no project code."""
    defended = defended.eval().cpu()
    with torch.no_grad():
        traced = torch.jit.trace(defended, example.cpu(), check_trace=False)
    torch.jit.save(traced, str(path))
    return Path(path)
