"""The fixed output remapping M: a seeded derangement of the labels."""

from __future__ import annotations

import torch


def derangement(num_classes: int, seed: int) -> torch.Tensor:
    """A uniformly random permutation with no fixed point (rejection sampling: ~e tries)."""
    if num_classes < 2:
        raise ValueError("a derangement needs at least two classes")
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(num_classes, generator=gen)
        if not (perm == torch.arange(num_classes)).any():
            return perm


def inverse(mapping: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(mapping)
    inv[mapping] = torch.arange(len(mapping))
    return inv


def remap_probabilities(probs: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """q[:, pi[j]] = p[:, j]: when f says j, the defended model says pi[j]."""
    return probs.index_select(1, inverse(mapping).to(probs.device))
