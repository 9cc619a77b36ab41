"""Label-only black-box trigger detection: where the API's decision boundary toward each class is sharpest.

An API that answers labels only gives no gradient, so the white-box search
(trigger.py) cannot run on it. This follows the idea of AEVA (Guo et al., ICLR 2022,
"AEVA: Black-box Backdoor Detection Using Adversarial Extreme Value Analysis"): the
smallest change that sends an image to a backdoor's target class is the trigger, so
near the boundary toward that class the adversarial direction concentrates on the
trigger's few pixels, while toward a normal class it spreads over the object.

For each candidate class t and a few held-out clean images the API labels otherwise:

1. **Boundary.** Binary search on the segment from the image to a held-out image the
   API labels t, down to the last point labelled t.
2. **Gradient sign.** At that point, probe random Gaussian directions (per pixel, or
   per ``block``-square of pixels); the API's answers (t or not) weigh the
   directions, with their mean subtracted: the HopSkipJump estimate of the
   boundary's normal from labels only (Chen et al., 2020).
3. **Hop.** Step along that normal while the label stays t, then binary-search back
   toward the clean image: the boundary point moves toward the smallest change that
   reaches t, where a backdoor's shortcut shows. ``iterations`` rounds of 2-3.
4. **Map.** The absolute per-pixel estimates of every round, each normalised to unit
   length, summed per image and averaged over images: one map per class.
5. **Peak.** The map's largest window mean (``peak_window`` pixels square, which
   averages noise over a patch-sized trigger) over the map's mean: 1 for a flat map,
   large when the boundary hinges on a few pixels. This is AEVA's global adversarial
   peak, taken on a window for the noisier estimates a small query budget gives.

Measured while building this (tests/unit/test_label_only.py's 16x16 gratings, five
classes, a 3x3 checkerboard patch): with one image per class, five rounds of 80
directions (2,275 queries), the backdoored model's target had the highest peak, at
the patch, for four seeds of six (seeds 0-3; at seed 5 its peak sat on the patch but
another class's was higher); the clean model's anomaly index ranged 1.0-7.2 over the
same seeds, above the backdoored model's at two of them, so one run's index is noisy
with few classes. Eight rounds of 50 directions named the target for three of six. Averaging more
images per class did not sharpen the target's peak there: a source image whose
rounds do not find the shortcut dilutes the map. A white-box check of the premise
(minimal L2 perturbations by gradient descent) peaked at the patch only on the
grating data; on striped classes confined to the image centre the smallest change
to any class stayed in the centre, and so did every map.

Classes are scored by the MAD anomaly index of their peaks (anomaly.py, on the
inverted peaks: there a small value is the outlier); the class with the highest peak
is the suspect. Every image sent counts against a hard cap, planned up front, so the
search never exceeds it: when the cap cannot pay for ``images_per_class`` images per
class, fewer are used (``queries_for`` is the arithmetic the audit plan uses too).

**It does not separate on the model zoo, so it never moves the verdict.** Measured by
bench/detection_fmnist.py --blackbox-labels on the zoo's 26 held-out models (14
poisoned, 12 clean; ``quick``'s ~2,150 queries per model): ROC-AUC 0.54 (bootstrap 95%
interval 0.30-0.77), the target named for 6 of 14 (over the 11 whose trigger works:
0.52 and 5 of 11; with a fourth build, 0.54 over 23 working backdoors and 24 clean
models); on an earlier held-out build 0.44
and 3 of 14, where only one backdoor (a label-consistent patch in four corners, index
15.9) stood out.
Audits report it beside the verdict as evidence to look at. It cannot see
triggers that are not local (blends, warps, sample-specific triggers) and it needs
held-out images the API labels as each class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from auditor.detection.anomaly import anomaly_indices, most_anomalous
from auditor.runtime import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress

log = logging.getLogger(__name__)

#: images in [0, 1] (N, C, H, W) -> int labels (N,): the audit's API client behind ``api_predictor``.
LabelFn = Callable[[torch.Tensor], torch.Tensor]
METHOD = "aeva-peak"  # named in the report so a later method cannot be mistaken for this one


@dataclass(frozen=True)
class LabelOnlyConfig:
    """How many images and queries each class gets; the audit plan sets them from the effort level."""

    images_per_class: int = 1  # clean images whose boundary toward each class is probed (fewer if the cap is tight)
    iterations: int = 5  # HopSkipJump rounds per image: each moves the boundary point closer to the clean image
    directions: int = 80  # random directions per gradient estimate: the estimate's noise falls as 1/sqrt
    search_steps: int = 8  # halvings per boundary search: the point within 1/256 of the segment
    step_tries: int = 4  # halvings of a gradient step that left class t before the round gives up on the image
    delta: float = 0.05  # probing radius, as a share of the current perturbation's length (HopSkipJump's dist/sqrt(d))
    block: int = 1  # directions drawn per block x block pixels (1: per pixel; 2 blurred a 3x3 patch in the tests)
    peak_window: int = 3  # side of the window the peak averages over: the size of a small patch trigger
    seed: int = 0

    def __post_init__(self) -> None:
        counts = (self.images_per_class, self.iterations, self.directions, self.search_steps, self.block,
                  self.peak_window)
        if min(counts) < 1 or self.step_tries < 0:
            raise ValueError("images_per_class, iterations, directions, search_steps, block and peak_window must be "
                             "at least 1, step_tries at least 0")
        if not 0.0 < self.delta < 1.0:
            raise ValueError("delta must be in (0, 1)")

    @property
    def queries_per_image(self) -> int:
        """The most one image's search can send: the first boundary search, then per round probes, step, search."""
        return self.search_steps + self.iterations * (self.directions + self.step_tries + 1 + self.search_steps)


@dataclass(frozen=True)
class LabelOnlyResult:
    """Per-class peaks, the suspect, the maps (for a picture) and the queries that bought them."""

    suspected_class: int  # the class with the highest peak
    anomaly_index: float  # its MAD anomaly index (>= 0; 0: typical)
    peaks: tuple[float, ...]  # per class: the map's largest window mean over its mean (1.0: flat or unmeasured)
    anomaly_indices: tuple[float, ...]  # per class (positive: a sharper peak than typical)
    images: tuple[int, ...]  # per class: images whose estimates went into the map
    peak_pixels: tuple[tuple[int, int], ...]  # per class: (row, col) of the peak window's centre
    maps: torch.Tensor  # (K, H, W), each a mean of unit-length maps of absolute normal estimates
    queries: int  # images sent, every one counted (cached answers too)
    query_cap: int
    config: LabelOnlyConfig
    seconds: float


def queries_for(num_classes: int, images_per_class: int, config: LabelOnlyConfig) -> int:
    """The most images sent for ``images_per_class`` per class: labelling the candidates, then each image's search."""
    return num_classes * (images_per_class + 1) + num_classes * images_per_class * config.queries_per_image


def images_within(cap: int, num_classes: int, config: LabelOnlyConfig) -> int:
    """The most images per class (at most the config's) whose queries fit ``cap``; 0 if not even one does."""
    n = config.images_per_class
    while n > 0 and queries_for(num_classes, n, config) > cap:
        n -= 1
    return n


class _Counted:
    """The predictor with every image counted against the cap; exceeding it is a bug in the planning above."""

    def __init__(self, predict: LabelFn, cap: int):
        self.predict, self.cap, self.used = predict, cap, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        if self.used + len(x) > self.cap:
            raise RuntimeError(f"label-only detection would send {self.used + len(x)} images, over its cap {self.cap}")
        self.used += len(x)
        return self.predict(x).reshape(-1).to(device=x.device, dtype=torch.long)


def label_only_detection(predict: LabelFn, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         config: LabelOnlyConfig, query_cap: int, *, on_progress: ProgressFn = no_progress,
                         should_cancel: CancelFn = never_cancel, stage: str = "detect") -> LabelOnlyResult:
    """Score every class by its boundary map's peak (module docstring); never sends more than ``query_cap``.

    ``images`` are held-out clean images in [0, 1] (N, C, H, W) with their ``labels``; the
    API's own labels decide which images anchor and start each search. Raises ValueError
    when the cap cannot pay for one image per class.
    """
    started = time.perf_counter()
    n = images_within(query_cap, num_classes, config)
    if n == 0:
        raise ValueError(f"a query cap of {query_cap} cannot pay for one image per class "
                         f"({queries_for(num_classes, 1, config)} queries)")
    counted = _Counted(predict, query_cap)
    gen = torch.Generator().manual_seed(config.seed)
    chosen = _balanced(labels, num_classes, n + 1, gen)
    x = images[chosen].float()
    pairs = _pairs(counted(x), num_classes, n, gen)
    source = x[[s for s, _, _ in pairs]]
    target = torch.tensor([t for _, _, t in pairs], dtype=torch.long, device=x.device)
    point = _boundary(counted, source, x[[a for _, a, _ in pairs]], target, config.search_steps)
    estimates = torch.zeros(len(pairs), *x.shape[2:], device=x.device)
    for round_ in range(config.iterations):
        point, normals = _hop(counted, source, point, target, round_, config, gen, should_cancel)
        estimates += _unit(normals.abs().sum(1))
        on_progress(stage, round_ + 1, config.iterations + 1)
    maps, used = _class_maps(estimates, target, num_classes)
    return _scored(maps, used, counted, query_cap, config, time.perf_counter() - started)


def _balanced(labels: torch.Tensor, num_classes: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Up to ``per_class`` seeded picks of each class: anchors for it and sources for the others."""
    picks = []
    for k in range(num_classes):
        members = torch.nonzero(labels.cpu() == k).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


def _pairs(answers: torch.Tensor, num_classes: int, n: int, gen: torch.Generator) -> list[tuple[int, int, int]]:
    """(source, anchor, target) per class: ``n`` sources the API does not label t, each with an anchor it does.

    Sources are spread over the other classes by a seeded shuffle; a class the API gives
    no held-out image gets no pair (its map stays empty and its peak reads 1).
    """
    answers = answers.cpu()
    pairs = []
    for t in range(num_classes):
        anchors = torch.nonzero(answers == t).flatten()
        sources = torch.nonzero(answers != t).flatten()
        if len(anchors) == 0 or len(sources) == 0:
            continue
        sources = sources[torch.randperm(len(sources), generator=gen)[:n]]
        pairs += [(int(s), int(anchors[j % len(anchors)]), t) for j, s in enumerate(sources)]
    return pairs


def _boundary(predict: _Counted, source: torch.Tensor, inside: torch.Tensor, target: torch.Tensor,
              steps: int) -> torch.Tensor:
    """For every pair at once, the last point labelled t on the segment source -> inside after ``steps`` halvings."""
    low = torch.zeros(len(source), device=source.device)  # labelled otherwise (the source)
    high = torch.ones(len(source), device=source.device)  # labelled t (``inside``)
    for _ in range(steps):
        mid = (low + high) / 2
        hit = predict(_blend(source, inside, mid)) == target
        high = torch.where(hit, mid, high)
        low = torch.where(hit, low, mid)
    return _blend(source, inside, high)


def _blend(source: torch.Tensor, inside: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.view(-1, *([1] * (source.dim() - 1)))
    return (1 - a) * source + a * inside


def _hop(predict: _Counted, source: torch.Tensor, point: torch.Tensor, target: torch.Tensor, round_: int,
         config: LabelOnlyConfig, gen: torch.Generator,
         should_cancel: CancelFn) -> tuple[torch.Tensor, torch.Tensor]:
    """One HopSkipJump round for every pair: estimate the boundary normal, step along it while the label stays t
    (halving the step up to ``step_tries`` times) and search back toward the source image. A pair whose probes all
    agreed, or whose every step left class t, keeps its boundary point."""
    distance = _norms(point - source)
    normals = torch.zeros_like(point)
    for i in range(len(point)):
        check_cancel(should_cancel)
        normals[i] = _normal(predict, point[i], int(target[i]), float(distance[i]) * config.delta, config, gen)
    step = distance / (round_ + 1) ** 0.5
    stepped = point.clone()
    pending = _norms(normals) > 0
    for _ in range(config.step_tries + 1):
        idx = torch.nonzero(pending).flatten()
        if len(idx) == 0:
            break
        candidate = (point[idx] + _expand(step[idx], point) * normals[idx]).clamp(0, 1)
        kept = predict(candidate) == target[idx]
        stepped[idx[kept]] = candidate[kept]
        pending[idx[kept]] = False
        step[idx[~kept]] /= 2
    moved = torch.nonzero((_norms(normals) > 0) & ~pending).flatten()
    point = point.clone()
    point[moved] = _boundary(predict, source[moved], stepped[moved], target[moved], config.search_steps)
    return point, normals


def _normal(predict: _Counted, point: torch.Tensor, target: int, radius: float, config: LabelOnlyConfig,
            gen: torch.Generator) -> torch.Tensor:
    """The unit estimate of the boundary's normal toward t from label answers (zeros when every probe agreed)."""
    c, h, w = point.shape
    b = config.block
    coarse = torch.randn(config.directions, c, -(-h // b), -(-w // b), generator=gen)
    u = coarse.repeat_interleave(b, 2).repeat_interleave(b, 3)[:, :, :h, :w].to(point.device)
    u = u / _expand(_norms(u).clamp_min(1e-12), u)
    phi = (predict((point + radius * u).clamp(0, 1)) == target).float() * 2 - 1
    grad = (_expand(phi - phi.mean(), u) * u).mean(0)
    return grad / _norms(grad[None]).clamp_min(1e-12)[0]


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to unit length (an all-zero map stays zero), so every estimate weighs the same."""
    return maps / _expand(_norms(maps).clamp_min(1e-12), maps)


def _class_maps(estimates: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """Per class, the mean unit-length map of its pairs' summed |estimates|, and how many pairs it has."""
    magnitude = _unit(estimates)
    maps = torch.zeros(num_classes, *magnitude.shape[1:], device=magnitude.device)
    used = [0] * num_classes
    for i in range(len(target)):
        maps[int(target[i])] += magnitude[i]
        used[int(target[i])] += 1
    counts = torch.tensor(used, dtype=maps.dtype, device=maps.device).clamp_min(1)
    return maps / _expand(counts, maps), used


def _scored(maps: torch.Tensor, used: list[int], predict: _Counted, cap: int, config: LabelOnlyConfig,
            seconds: float) -> LabelOnlyResult:
    """Average the maps, take each class's windowed peak and the anomaly index of the peaks."""
    maps = maps.cpu()
    peaks, centres = zip(*(_peak(m, config.peak_window) if used[k] else (1.0, (0, 0)) for k, m in enumerate(maps)))
    inverted = [1.0 / p for p in peaks]  # anomaly.py flags the small side
    suspect, index = most_anomalous(inverted)
    result = LabelOnlyResult(
        suspected_class=suspect, anomaly_index=index, peaks=tuple(peaks),
        anomaly_indices=tuple(anomaly_indices(inverted)), images=tuple(used), peak_pixels=tuple(centres),
        maps=maps, queries=predict.used, query_cap=cap, config=config, seconds=seconds,
    )
    log.info("label-only detection: class %d, anomaly index %.2f, peaks %s, %d queries", suspect, index,
             [round(p, 2) for p in peaks], predict.used)
    return result


def _peak(heat: torch.Tensor, window: int) -> tuple[float, tuple[int, int]]:
    """The largest ``window``-square mean over the map's mean, and the window's centre pixel."""
    w = min(window, *heat.shape)
    pooled = F.avg_pool2d(heat[None, None], w, stride=1)[0, 0]
    mean = float(heat.mean())
    flat = int(pooled.argmax())
    row, col = divmod(flat, pooled.shape[1])
    peak = float(pooled.max()) / mean if mean > 0 else 1.0
    return peak, (row + w // 2, col + w // 2)
