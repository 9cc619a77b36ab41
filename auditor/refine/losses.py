"""REFINE's two loss terms: fit the remapped output to f's pseudo-labels, and cluster T's images."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) with one view per sample.

    Anchors without any positive in the batch are skipped rather than counted as
    zero, so rare pseudo-classes do not dilute the loss.
    """
    z = F.normalize(features.flatten(1).float(), dim=1)
    logits = z @ z.T / temperature
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has_pos = counts > 0
    if not has_pos.any():
        return z.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / counts[has_pos]
    return -mean_log_prob.mean()


def fit_loss(kind: str, logits_t: torch.Tensor, logits_clean: torch.Tensor, inv_mapping: torch.Tensor, kd_temperature: float) -> torch.Tensor:
    """How well M(f(T(x))) reproduces f(x).

    With q = p(T(x))[:, inv] the remapped distribution and y = argmax f(x):
    ``bce`` is the authors' code, ``ce`` the paper's text, ``kd`` matches the
    whole softened distribution of f(x), which keeps more of f's behaviour.
    """
    remapped_logits = logits_t.index_select(1, inv_mapping)
    pseudo = logits_clean.argmax(1)
    if kind == "ce":
        return F.cross_entropy(remapped_logits, pseudo)
    if kind == "bce":
        q = remapped_logits.softmax(1).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(q, F.one_hot(pseudo, q.shape[1]).float())
    t = kd_temperature
    target = (logits_clean / t).softmax(1)
    return F.kl_div((remapped_logits / t).log_softmax(1), target, reduction="batchmean") * t * t
