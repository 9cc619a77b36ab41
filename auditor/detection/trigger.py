"""White-box trigger reverse-engineering: the smallest mask and pattern that send clean images to each class.

For every candidate target class c a mask m (H x W, shared by the channels) and a
pattern p (C x H x W) are optimised so that the stamped image

    x' = (1 - m) * x + m * p

is classified as c, while the mask stays small:

    loss_c = CE(f(x'), c) + lambda_c * |m|_1

Both are parametrised through a sigmoid, so they stay in [0, 1] without clipping,
and trained with Adam on a small set of clean images. lambda starts at 0, so the
search first finds any trigger; once one works on a batch, lambda is switched on
and then adjusted every few steps: raised while the trigger keeps working
(shrink the mask), lowered when it stops (let it grow back). The smallest mask
that worked on a batch is kept. All classes are optimised together in one
batched forward pass, which is what keeps the search cheap on a CPU.

A backdoor is a shortcut: its target needs a far smaller mask than any other
class, which the MAD anomaly index of the mask norms measures (anomaly.py, with
the guard it describes for few classes). The
recovered trigger is then applied to held-out clean images of the other classes,
and the share classified as the suspected class is its measured success rate.

What it cannot see: triggers that are not a fixed stamp (sample-specific or
warping triggers such as WaNet, input-aware or frequency triggers), triggers
larger than the mask a normal class needs, and backdoors with several targets
(each looks normal next to the others).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from auditor.data import ImageSet, take
from auditor.detection.anomaly import anomaly_indices, is_flagged, most_anomalous, norm_ratio
from auditor.evaluation.intervals import Interval, wilson
from auditor.runtime import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress

log = logging.getLogger(__name__)

#: Images stamped per forward pass across all classes optimised together (classes x batch); more classes are chunked.
MAX_STAMPED_PER_PASS = 2048


@dataclass(frozen=True)
class TriggerSearchConfig:
    """How hard to search; the audit plan sets steps and images from the effort level."""

    steps: int = 300  # Adam steps per class
    images: int = 256  # clean images the masks are optimised on (batches are drawn from them)
    batch_size: int = 32  # clean images per step and class
    holdout_images: int = 500  # held-out clean images the recovered trigger is measured on
    lr: float = 0.1  # Adam, on the sigmoid logits of mask and pattern
    init_cost: float = 1e-3  # lambda once a first trigger works (on the L1 norm in pixels)
    cost_up: float = 1.5  # lambda *= cost_up while the trigger keeps working ...
    cost_down: float = 1.5 ** 1.5  # ... and /= cost_down when it stops
    patience: int = 5  # steps between lambda adjustments
    success_target: float = 0.99  # batch success at which a trigger "works"
    seed: int = 0


@dataclass(frozen=True)
class TriggerSearchResult:
    """The search's answer: which class looks like a backdoor target, how strongly, and its recovered trigger."""

    suspected_class: int  # the class with the smallest mask
    anomaly_index: float  # its MAD anomaly index (0: typical)
    norm_ratio: float  # its mask norm as a share of the median class's
    flagged: bool  # anomaly index >= 2 and norm ratio <= 0.5 (anomaly.py)
    mask_norms: tuple[float, ...]  # per class: L1 norm of the best mask, in pixels
    anomaly_indices: tuple[float, ...]  # per class (positive: smaller than typical)
    reached: tuple[bool, ...]  # per class: whether any mask reached success_target on a batch
    mask: torch.Tensor  # (1, H, W) in [0, 1], of the suspected class
    pattern: torch.Tensor  # (C, H, W) in [0, 1], of the suspected class
    success: Interval  # the recovered trigger on held-out clean images not of the suspected class
    steps: int
    images: int
    seconds: float

    @property
    def mask_fraction(self) -> float:
        """The suspected mask's L1 norm as a share of the image area."""
        return float(self.mask.sum() / self.mask[0].numel())


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * p for images (N, C, H, W), a mask (1, H, W) and a pattern (C, H, W)."""
    return (1 - mask) * x + mask * pattern


def search_triggers(model: torch.nn.Module, clean: ImageSet, holdout: ImageSet, num_classes: int,
                    config: TriggerSearchConfig = TriggerSearchConfig(), *, device: torch.device | str = "cpu",
                    on_progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                    stage: str = "detect") -> TriggerSearchResult:
    """Reverse-engineer a trigger for every class, flag the anomalous one and measure its trigger on ``holdout``.

    ``holdout`` needs labels (the success rate counts images not of the suspected class);
    ``clean`` does not. The model is left in eval mode and its parameters untouched.
    """
    if holdout.y is None:
        raise ValueError("the held-out images need labels to measure the recovered trigger")
    started = time.perf_counter()
    device = torch.device(device)
    _eval_mode(model)
    images = take(clean, config.images, config.seed).x.float().div(255)
    masks, patterns, norms, reached = [], [], [], []
    chunk = max(1, MAX_STAMPED_PER_PASS // max(1, min(config.batch_size, len(images))))
    for first in range(0, num_classes, chunk):
        classes = list(range(first, min(num_classes, first + chunk)))
        m, p, n, r = _optimise(model, images, classes, config, device, should_cancel)
        masks.append(m)
        patterns.append(p)
        norms += n
        reached += r
        on_progress(stage, classes[-1] + 1, num_classes + 1)
    suspect, index = most_anomalous(norms)
    ratio = norm_ratio(norms, suspect)
    mask, pattern = torch.cat(masks)[suspect], torch.cat(patterns)[suspect]
    success = trigger_success(model, holdout, suspect, mask, pattern, config.holdout_images, config.seed, device)
    on_progress(stage, num_classes + 1, num_classes + 1)
    result = TriggerSearchResult(
        suspected_class=suspect, anomaly_index=index, norm_ratio=ratio, flagged=is_flagged(index, ratio),
        mask_norms=tuple(norms), anomaly_indices=tuple(anomaly_indices(norms)), reached=tuple(reached),
        mask=mask, pattern=pattern, success=success, steps=config.steps, images=len(images),
        seconds=time.perf_counter() - started,
    )
    log.info("trigger search: class %d, anomaly index %.2f, success %.3f of %d, norms %s", suspect, index,
             success.value, success.n, [round(v, 1) for v in norms])
    return result


def _eval_mode(model: torch.nn.Module) -> None:
    """Dropout and batch-norm statistics off; a ``torch.export`` module refuses eval() but is traced in eval mode."""
    try:
        model.eval()
    except NotImplementedError:
        pass


def _optimise(model: torch.nn.Module, images: torch.Tensor, classes: list[int], config: TriggerSearchConfig,
              device: torch.device, should_cancel: CancelFn) -> tuple[torch.Tensor, torch.Tensor, list[float], list[bool]]:
    """One chunk of classes, optimised together; returns each class's best mask, pattern, norm and whether it worked."""
    k = len(classes)
    _, c, h, w = images.shape
    gen = torch.Generator().manual_seed(config.seed + classes[0])
    mask_logit = torch.zeros(k, 1, 1, h, w, device=device).requires_grad_()
    pattern_logit = (torch.rand(k, 1, c, h, w, generator=gen) * 2 - 1).to(device).requires_grad_()
    optimiser = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))
    cost = torch.zeros(k, device=device)
    started = torch.zeros(k, dtype=torch.bool, device=device)  # lambda switched on
    window = torch.zeros(k, device=device)  # summed batch success since the last adjustment
    best_norm = torch.full((k,), float("inf"), device=device)
    best_mask = torch.sigmoid(mask_logit.detach()[:, 0]).clone()
    best_pattern = torch.sigmoid(pattern_logit.detach()[:, 0]).clone()
    targets = torch.tensor(classes, device=device)
    batch = min(config.batch_size, len(images))
    for step in range(config.steps):
        if step % 10 == 0:
            check_cancel(should_cancel)
        pick = torch.randint(len(images), (batch,), generator=gen)
        x = images[pick].to(device)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        stamped = stamp(x.unsqueeze(0), mask, pattern).reshape(k * batch, c, h, w)
        logits = model(stamped).float()
        wanted = targets.repeat_interleave(batch)
        ce = F.cross_entropy(logits, wanted, reduction="none").view(k, batch).mean(1)
        norm = mask.sum(dim=(1, 2, 3, 4))
        loss = (ce + cost * norm).sum()
        optimiser.zero_grad(set_to_none=True)
        mask_logit.grad, pattern_logit.grad = torch.autograd.grad(loss, [mask_logit, pattern_logit])
        optimiser.step()
        with torch.no_grad():
            success = (logits.argmax(1) == wanted).float().view(k, batch).mean(1)
            works = success >= config.success_target
            better = works & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best_mask[better] = mask[better, 0]
            best_pattern[better] = pattern[better, 0]
            switch_on = works & ~started
            cost[switch_on] = config.init_cost
            started |= switch_on
            window += success
            if (step + 1) % config.patience == 0:
                kept = started & (window / config.patience >= config.success_target)
                cost = torch.where(started, torch.where(kept, cost * config.cost_up, cost / config.cost_down), cost)
                window.zero_()
    found = torch.isfinite(best_norm)
    final = torch.sigmoid(mask_logit.detach()[:, 0])
    # A class no mask reached keeps its last mask: its (large) norm says "hard to reach", which is the point.
    best_mask[~found] = final[~found]
    best_pattern[~found] = torch.sigmoid(pattern_logit.detach()[:, 0])[~found]
    norms = best_mask.sum(dim=(1, 2, 3))
    return best_mask.cpu(), best_pattern.cpu(), norms.tolist(), found.tolist()


def trigger_success(model: torch.nn.Module, holdout: ImageSet, target: int, mask: torch.Tensor, pattern: torch.Tensor,
                    limit: int, seed: int, device: torch.device | str = "cpu") -> Interval:
    """Share of held-out clean images not labelled ``target`` that the stamped trigger sends to ``target``."""
    assert holdout.y is not None
    others = holdout.subset(torch.nonzero(holdout.y != target).flatten())
    others = take(others, limit, seed + 7)
    hits = 0
    with torch.no_grad():
        for xb, _ in others.batches(256):
            stamped = stamp(xb.to(device), mask.to(device), pattern.to(device))
            hits += int((model(stamped).argmax(1) == target).sum())
    return wilson(hits, len(others))
