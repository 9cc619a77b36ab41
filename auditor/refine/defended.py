"""The defended model M o softmax o f o T as one module (its files: ``auditor.refine.export``)."""

from __future__ import annotations

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

