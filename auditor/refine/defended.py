"""The defended model M o softmax o f o T as one module (its files: ``auditor.refine.export``)."""

from __future__ import annotations

import copy

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


class ChannelsLastTransform(nn.Module):
    """T evaluated in channels-last layout, taking and returning default-layout images.

    The U-Net's convolutions run 1.6-2.4x faster in channels-last on CPU (measured at two
    threads on AVX2 and avx512_bf16 CPUs: ``bench/results/defended_inference*.json``),
    and after REFINE most of an audit's inference is T. Only T changes layout: the
    audited model receives contiguous images, since its code may ``view`` them. The
    wrapped T is a copy, so the T that is exported and stored keeps its own layout.
    """

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(transform).to(memory_format=torch.channels_last).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last)).contiguous()


def inference_transform(transform: nn.Module) -> nn.Module:
    """T as the audit runs it for inference only (never for training or export)."""
    return transform if isinstance(transform, ChannelsLastTransform) else ChannelsLastTransform(transform)
