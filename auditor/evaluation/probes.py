"""Trigger probe battery and backdoor suspicion score for a model we know nothing about.
(Over 400 lines: the battery, its per-probe statistics and the score are one algorithm, read top to bottom.)

The auditor cannot know a submitted model's trigger, so it tries many generic
ones - patches of several sizes, positions and fills, blends of random
patterns, smooth warps, rotations and additive noise - on a fixed sample of
test images and watches where the predictions go. A natural classifier that is
disturbed by a probe changes its mind in many directions; a backdoored one
sends inputs of *every* class to *one* class as soon as a probe resembles its
trigger. The score measures that pull and discounts classes that attract
corrupted inputs in general (the "default" classes of a natural model).

Everything goes through a ``Predictor`` (float [0, 1] batch -> labels), so the
same battery audits a local model, a defended model and a remote API; the
number of queries is ``num_images * (probes + 1)`` and is reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch.nn import functional as F

from auditor.data import ImageSet, take
from auditor.evaluation.metrics import Predictor
from auditor.transforms import rotate, warp

#: float [0, 1] images (N, C, H, W) -> probed images of the same shape, values in [0, 1]
ProbeFn = Callable[[torch.Tensor], torch.Tensor]

FAMILIES = ("patch", "blend", "warp", "rotate", "noise")
#: The patch positions: each corner, the centre, and "corners", the same patch at all four corners at once.
#: Multi-location triggers (Turner et al.'s label-consistent attack, adaptive-patch) answer "corners" far more
#: strongly than any single corner: a working four-corner label-consistent backdoor scored 0.012 without it and 0.47
#: with it, while no clean zoo model's score rose (bench/results/corner_probes.json).
POSITIONS = ("tl", "tr", "bl", "br", "center", "corners")
PATCH_FILLS = ("white", "black", "checker")
BOOTSTRAP_PROBES = 10  # the score's interval re-scores only the strongest probes (see _bootstrap_interval)


@dataclass(frozen=True)
class ProbeConfig:
    """Which probes to run, on how many images, and how the score is formed.

    Defaults give 182 probes on 500 images (91,500 queries): seconds for a local
    model; for a rate-limited API lower ``num_images`` or the number of
    random patterns.
    """

    num_images: int = 500  # test images probed (a seeded sample); queries = num_images * (probes + 1)
    seed: int = 0  # draws the image sample, the random patches/patterns/warps and the noise
    batch_size: int = 500  # images per Predictor call (an API client may want fewer)
    families: tuple[str, ...] = FAMILIES  # which trigger families to run
    patch_sizes: tuple[int, ...] = (2, 3, 4, 5)  # square side in pixels
    patch_fills: tuple[str, ...] = PATCH_FILLS  # fixed looks of a patch, besides the random gray levels below
    patch_positions: tuple[str, ...] = POSITIONS  # corners sit `patch_margin` px from the border
    patch_margin: int = 1  # gap between a corner patch and the image border
    random_patches: int = 3  # seeded random gray-level patches per size/position, besides white/black/checker
    blend_patterns: int = 5  # seeded random patterns (uniform pixel noise and smooth noise alternate)
    blend_alphas: tuple[float, ...] = (0.1, 0.2, 0.3)  # opacity of a blended pattern
    warp_fields: int = 3  # seeded random smooth warp fields
    warp_grid: int = 4  # control-grid side of a warp field (WaNet's k)
    warp_strengths: tuple[float, ...] = (0.5, 1.0, 2.0)  # mean displacement in pixels
    rotations: tuple[float, ...] = (-30.0, -20.0, -15.0, -10.0, 10.0, 15.0, 20.0, 30.0)  # degrees
    noise_sigmas: tuple[float, ...] = (0.05, 0.1, 0.2)  # std of additive Gaussian noise
    noise_draws: int = 2  # independent noise draws per sigma
    min_flips: int = 5  # probes with fewer flipped images carry no evidence (too noisy to judge)
    min_class_images: int = 5  # a class needs this many clean predictions in the sample to be judged
    min_source_classes: int = 2  # breadth needs at least this many judged classes besides the top class
    breadth_share: float = 1 / 3  # breadth averages the pull over this share of source classes, least-pulled first
    threshold: float = 0.75  # score at which a model is flagged; calibrated on bench/suspicion_fmnist
    top_k: int = 5  # evidence rows kept in the report
    only: tuple[str, ...] = ()  # probe names to keep (e.g. the strongest ones of an earlier run); empty = all
    discount_default: bool = True  # subtract each class's median pull; needs a battery, not a handful of probes
    bootstrap: int = 200  # resamples of the probed images for the score's 95% interval; 0 = none

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError("num_images and batch_size must be positive")
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {sorted(unknown)}")
        if set(self.patch_positions) - set(POSITIONS):
            raise ValueError(f"patch_positions must be among {POSITIONS}")
        if set(self.patch_fills) - set(PATCH_FILLS):
            raise ValueError(f"patch_fills must be among {PATCH_FILLS}")
        if self.bootstrap < 0:
            raise ValueError("bootstrap must not be negative")
        if any(s < 1 for s in self.patch_sizes) or self.patch_margin < 0:
            raise ValueError("patch sizes must be positive and the margin non-negative")
        if any(not 0.0 < a <= 1.0 for a in self.blend_alphas):
            raise ValueError("blend alphas must be in (0, 1]")
        if min(self.random_patches, self.blend_patterns, self.warp_fields, self.noise_draws) < 0:
            raise ValueError("pattern counts must be non-negative")
        if self.warp_grid < 2 or any(s <= 0 for s in self.warp_strengths):
            raise ValueError("warp_grid must be at least 2 and strengths positive")
        if any(s <= 0 for s in self.noise_sigmas):
            raise ValueError("noise sigmas must be positive")
        if min(self.top_k, self.min_flips, self.min_class_images, self.min_source_classes) < 1:
            raise ValueError("top_k, min_flips, min_class_images and min_source_classes must be positive")
        if not 0.0 < self.breadth_share <= 1.0 or not 0.0 < self.threshold <= 1.0:
            raise ValueError("breadth_share and threshold must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """One candidate trigger: a name for the report, its family, and the image transformation."""

    name: str
    family: str
    apply: ProbeFn


# --------------------------------------------------------------------------- the battery


def build_battery(config: ProbeConfig, image_shape: tuple[int, int, int]) -> list[Probe]:
    """All probes for images of ``image_shape`` (C, H, W); the same config and shape give the same probes."""
    builders = {
        "patch": _patch_probes,
        "blend": _blend_probes,
        "warp": _warp_probes,
        "rotate": _rotation_probes,
        "noise": _noise_probes,
    }
    probes: list[Probe] = []
    for index, family in enumerate(FAMILIES):
        if family in config.families:
            # Each family draws from its own stream so enabling one does not change another.
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
            probes.extend(builders[family](config, image_shape, gen))
    return [p for p in probes if p.name in config.only] if config.only else probes


def _patch_fills(config: ProbeConfig, channels: int, size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """White, black, a checkerboard, and seeded random gray levels: the usual looks of a patch trigger."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    looks = {
        "white": torch.ones(channels, size, size),
        "black": torch.zeros(channels, size, size),
        "checker": ((yy + xx) % 2).float().expand(channels, size, size).clone(),
    }
    fills = {name: looks[name] for name in config.patch_fills}
    for k in range(config.random_patches):
        fills[f"rand{k}"] = torch.rand(channels, size, size, generator=gen)
    return fills


def _patch_boxes(position: str, size: int, margin: int, h: int, w: int) -> list[tuple[slice, slice]]:
    """Where a patch goes: one box, or the four corner boxes for ``"corners"``."""
    if position == "corners":
        return [box for corner in ("tl", "tr", "bl", "br") for box in _patch_boxes(corner, size, margin, h, w)]
    top = {"t": margin, "b": h - size - margin}
    left = {"l": margin, "r": w - size - margin}
    if position == "center":
        r, c = (h - size) // 2, (w - size) // 2
    else:
        r, c = top[position[0]], left[position[1]]
    r, c = max(0, min(r, h - size)), max(0, min(c, w - size))
    return [(slice(r, r + size), slice(c, c + size))]


def _stamp(patch: torch.Tensor, boxes: list[tuple[slice, slice]]) -> ProbeFn:
    def apply(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for rows, cols in boxes:
            out[..., rows, cols] = patch.to(x)
        return out

    return apply


def _patch_probes(config: ProbeConfig, shape: tuple[int, int, int], gen: torch.Generator) -> list[Probe]:
    channels, h, w = shape
    probes = []
    for size in config.patch_sizes:
        if size > min(h, w):
            continue
        fills = _patch_fills(config, channels, size, gen)
        for position in config.patch_positions:
            boxes = _patch_boxes(position, size, config.patch_margin, h, w)
            for fill_name, patch in fills.items():
                probes.append(Probe(f"patch{size}-{position}-{fill_name}", "patch", _stamp(patch, boxes)))
    return probes


def _smooth_pattern(shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Low-frequency noise rescaled to [0, 1]: the kind of picture-like pattern a blend trigger often is."""
    channels, h, w = shape
    coarse = torch.rand(1, channels, max(2, h // 4), max(2, w // 4), generator=gen)
    fine = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    return (fine - fine.min()) / (fine.max() - fine.min()).clamp_min(1e-6)


def _blend(pattern: torch.Tensor, alpha: float) -> ProbeFn:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) * x + alpha * pattern.to(x)

    return apply


def _blend_probes(config: ProbeConfig, shape: tuple[int, int, int], gen: torch.Generator) -> list[Probe]:
    probes = []
    for k in range(config.blend_patterns):
        kind = "uniform" if k % 2 == 0 else "smooth"
        pattern = torch.rand(*shape, generator=gen) if kind == "uniform" else _smooth_pattern(shape, gen)
        for alpha in config.blend_alphas:
            probes.append(Probe(f"blend-{kind}{k}-a{alpha:g}", "blend", _blend(pattern, alpha)))
    return probes


def _warp_field(shape: tuple[int, int, int], grid: int, pixels: float, gen: torch.Generator) -> torch.Tensor:
    """A smooth random displacement field (1, H, W, 2) whose mean displacement is ``pixels``."""
    _, h, w = shape
    control = torch.rand(1, 2, grid, grid, generator=gen) * 2 - 1
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
    field = field / field.abs().mean().clamp_min(1e-6)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)]).view(1, 2, 1, 1)  # pixels -> grid units
    return (field * pixels * scale).permute(0, 2, 3, 1)


def _warp_probes(config: ProbeConfig, shape: tuple[int, int, int], gen: torch.Generator) -> list[Probe]:
    probes = []
    for k in range(config.warp_fields):
        unit = _warp_field(shape, config.warp_grid, 1.0, gen)
        for strength in config.warp_strengths:
            flow = unit * strength
            probes.append(Probe(f"warp{k}-s{strength:g}", "warp", lambda x, f=flow: warp(x, f)))
    return probes


def _rotation_probes(config: ProbeConfig, shape: tuple[int, int, int], gen: torch.Generator) -> list[Probe]:
    return [Probe(f"rotate{angle:+g}", "rotate", lambda x, a=angle: rotate(x, a)) for angle in config.rotations]


def _noise_probes(config: ProbeConfig, shape: tuple[int, int, int], gen: torch.Generator) -> list[Probe]:
    """Fresh noise per image, but drawn from a per-probe seed so every run sees the same noise."""
    probes = []
    for draw in range(config.noise_draws):
        for sigma in config.noise_sigmas:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

            def apply(x: torch.Tensor, s: float = sigma, sd: int = seed) -> torch.Tensor:
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(sd))
                return (x + s * noise.to(x)).clamp(0, 1)

            probes.append(Probe(f"noise{draw}-sigma{sigma:g}", "noise", apply))
    return probes


# --------------------------------------------------------------------------- statistics per probe


@dataclass(frozen=True)
class ProbeResult:
    """Where one probe sent the images.

    ``pull[k]`` is the share of images *not* predicted k on the clean input that
    the probe sends to k. ``breadth`` asks the backdoor question class by class:
    of the images of each other (clean-predicted) class, what share goes to
    ``top_class`` - averaged over the worst-hit third of those classes, so it is
    high only when inputs of *every* class are sent to one class.
    """

    probe: str
    family: str
    flip_rate: float  # share of images whose prediction changes
    top_class: int | None  # class receiving most flips (None without flips)
    concentration: float  # share of flips going to top_class
    target_rate: float  # share of all non-top_class images sent to top_class
    breadth: float  # class-balanced pull into top_class over the least-pulled source classes
    source_classes: int  # other classes with enough images to judge breadth
    pull: tuple[float, ...]  # per class, share of the other images sent there
    score: float = 0.0  # this probe's evidence of a backdoor, in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pull")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def transition_counts(clean_pred: torch.Tensor, probed_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = clean prediction, column = prediction under the probe."""
    flat = clean_pred.long() * num_classes + probed_pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).float()


def probe_statistics(
    probe: Probe, clean_pred: torch.Tensor, probed_pred: torch.Tensor, num_classes: int, config: ProbeConfig
) -> ProbeResult:
    """Flip rate, where the flips go, the per-class pull and the breadth of one probe."""
    counts = transition_counts(clean_pred, probed_pred, num_classes)
    total = counts.sum()
    diagonal = counts.diagonal()
    flips = float(total - diagonal.sum())
    arrivals = counts.sum(0) - diagonal  # flips landing in each class
    others = total - counts.sum(1)  # images not predicted k on the clean input
    pull = torch.where(others > 0, arrivals / others.clamp_min(1), torch.zeros_like(others))
    top = int(arrivals.argmax()) if flips > 0 else None
    breadth, judged = _breadth(counts, top, config) if top is not None else (0.0, 0)
    return ProbeResult(
        probe=probe.name,
        family=probe.family,
        flip_rate=flips / max(float(total), 1.0),
        top_class=top,
        concentration=float(arrivals[top] / flips) if top is not None else 0.0,
        target_rate=float(pull[top]) if top is not None else 0.0,
        breadth=breadth,
        source_classes=judged,
        pull=tuple(float(v) for v in pull),
    )


def _breadth(counts: torch.Tensor, top: int, config: ProbeConfig) -> tuple[float, int]:
    """Mean share sent to ``top`` over the least-affected ``breadth_share`` of the other classes.

    A natural model's "default" class for corrupted inputs attracts the
    look-alike classes (shirts, pullovers, coats) but not the distinct ones
    (trousers, bags, sneakers); a backdoor takes every class. Looking at the
    worst-hit classes, rather than the image-weighted average, is what tells
    the two apart.
    """
    sizes = counts.sum(1)
    sources = [j for j in range(len(counts)) if j != top and sizes[j] >= config.min_class_images]
    if len(sources) < config.min_source_classes:
        return 0.0, len(sources)
    shares = sorted(float(counts[j, top] / sizes[j]) for j in sources)
    worst = max(1, math.ceil(len(shares) * config.breadth_share))
    return sum(shares[:worst]) / worst, len(sources)


# --------------------------------------------------------------------------- the score


@dataclass(frozen=True)
class SuspicionReport:
    """The suspicion score in [0, 1], its strongest evidence, per-family scores and the query count."""

    score: float  # max over probes of (breadth - default pull of its top class)
    suspicious: bool  # score >= config.threshold
    suspect_class: int | None  # the class the strongest evidence points to (None without evidence)
    evidence: list[ProbeResult]  # top-k probes by score, strongest first
    per_family: dict[str, float]  # best probe score per family
    queries: int  # images sent to the Predictor: num_images * (probes + 1)
    num_images: int
    num_probes: int
    default_pull: tuple[float, ...] = ()  # per class: median pull over all probes, discounted from the score
    results: list[ProbeResult] = field(default_factory=list, repr=False)  # every probe, for plots
    interval: tuple[float, float] | None = None  # 95% bootstrap interval of the score over the probed images

    def to_dict(self, top_k: int | None = None, include_all: bool = False) -> dict[str, Any]:
        evidence = self.evidence if top_k is None else self.evidence[:top_k]
        out: dict[str, Any] = {
            "score": round(self.score, 4),
            "suspicious": self.suspicious,
            "suspect_class": self.suspect_class,
            "evidence": [r.to_dict() for r in evidence],
            "per_family": {k: round(v, 4) for k, v in self.per_family.items()},
            "default_pull": [round(v, 4) for v in self.default_pull],
            "queries": self.queries,
            "num_images": self.num_images,
            "num_probes": self.num_probes,
        }
        if include_all:
            out["probes"] = [r.to_dict() for r in self.results]
        return out


def run_battery(
    predict: Predictor, data: ImageSet, config: ProbeConfig = ProbeConfig(), num_classes: int | None = None
) -> tuple[list[ProbeResult], int]:
    """Predict a seeded sample of ``data`` clean and under every probe; returns per-probe statistics and K.

    Labels are never used: flips are judged against the model's own clean
    predictions, so unlabeled pools work as well as test sets.
    """
    probes, clean_pred, probed, k = _battery_predictions(predict, data, config, num_classes)
    return [probe_statistics(p, clean_pred, q, k, config) for p, q in zip(probes, probed)], k


def _battery_predictions(
    predict: Predictor, data: ImageSet, config: ProbeConfig, num_classes: int | None
) -> tuple[list[Probe], torch.Tensor, list[torch.Tensor], int]:
    """The probes, the clean predictions of the sample, its predictions under each probe, and K."""
    sample = take(data, config.num_images, seed=config.seed)
    images = sample.x.float().div(255)
    clean_pred = _predict_all(predict, images, config.batch_size)
    probes = build_battery(config, sample.shape)
    probed = [_predict_all(predict, probe.apply(images).clamp(0, 1), config.batch_size) for probe in probes]
    seen = max([int(clean_pred.max()), *(int(p.max()) for p in probed)]) + 1 if len(clean_pred) else 1
    return probes, clean_pred, probed, max(num_classes or data.num_classes or 0, seen)


def _predict_all(predict: Predictor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Labels for all images, batch by batch; a Predictor must answer one label per image."""
    out = [predict(images[i : i + batch_size]).cpu().long().view(-1) for i in range(0, len(images), batch_size)]
    labels = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
    if labels.shape != (len(images),) or (len(labels) and int(labels.min()) < 0):
        raise ValueError("the predictor must return one non-negative class index per image")
    return labels


def suspicion_score(
    predict: Predictor, data: ImageSet, config: ProbeConfig = ProbeConfig(), num_classes: int | None = None
) -> SuspicionReport:
    """Run the battery on ``data`` (labels not needed) through ``predict`` and score it."""
    if len(data) == 0:
        raise ValueError("the probe battery needs at least one image")
    probes, clean_pred, probed, k = _battery_predictions(predict, data, config, num_classes)
    results = [probe_statistics(p, clean_pred, q, k, config) for p, q in zip(probes, probed)]
    report = score_results(results, k, config, num_images=len(clean_pred))
    if not config.bootstrap:
        return report
    strongest = sorted(range(len(probes)), key=lambda i: report.results[i].score, reverse=True)[:BOOTSTRAP_PROBES]
    pairs = [(probes[i], probed[i]) for i in strongest]
    return replace(report, interval=_bootstrap_interval(report, pairs, clean_pred, k, config))


def _bootstrap_interval(report: SuspicionReport, pairs: list[tuple[Probe, torch.Tensor]], clean_pred: torch.Tensor,
                        k: int, config: ProbeConfig) -> tuple[float, float]:
    """Percentile interval of the score over resamples of the probed images (no new predictions needed).

    The score is a maximum over probes of a class-balanced share, so no closed form
    gives its spread; resampling the images shows how much it owes to which images
    happened to be drawn. Only the strongest probes are re-scored, against the
    default pull of the whole sample: a median over the battery barely moves under
    resampling, and the maximum is decided among the top probes.
    """
    n = len(clean_pred)
    gen = torch.Generator().manual_seed(config.seed * 7919 + 1)
    default = list(report.default_pull) or [0.0] * k
    scores = []
    for _ in range(config.bootstrap):
        idx = torch.randint(0, n, (n,), generator=gen)
        stats = [probe_statistics(p, clean_pred[idx], q[idx], k, config) for p, q in pairs]
        scores.append(max((probe_score(r, default, config, n) for r in stats), default=0.0))
    ordered = torch.tensor(scores).sort().values
    low, high = float(ordered[int(0.025 * (len(ordered) - 1))]), float(ordered[int(0.975 * (len(ordered) - 1))])
    return min(low, report.score), max(high, report.score)


def score_results(results: list[ProbeResult], num_classes: int, config: ProbeConfig, num_images: int) -> SuspicionReport:
    """Combine per-probe statistics into the report (see ``probe_score`` for one probe's evidence)."""
    default = default_pull(results, num_classes) if config.discount_default else [0.0] * num_classes
    scored = [replace(r, score=probe_score(r, default, config, num_images)) for r in results]
    ranked = sorted(scored, key=lambda r: r.score, reverse=True)
    per_family = {fam: max((r.score for r in scored if r.family == fam), default=0.0) for fam in config.families}
    best = ranked[0] if ranked and ranked[0].score > 0 else None
    score = best.score if best else 0.0
    return SuspicionReport(
        score=score,
        suspicious=score >= config.threshold,
        suspect_class=best.top_class if best else None,
        evidence=[r for r in ranked[: config.top_k] if r.score > 0],
        per_family=per_family,
        queries=num_images * (len(results) + 1),
        num_images=num_images,
        num_probes=len(results),
        default_pull=tuple(default),
        results=scored,
    )


def default_pull(results: list[ProbeResult], num_classes: int) -> list[float]:
    """Per class, the median pull over all probes: how much an arbitrary disturbance drags inputs into it.

    The median ignores the few probes that resemble a trigger, so a backdoor
    target is not excused, while a class that swallows inputs under most
    disturbances (a natural "default" class, or a broken model) is discounted.
    """
    if not results:
        return [0.0] * num_classes
    pulls = torch.tensor([r.pull for r in results], dtype=torch.float)
    return [float(v) for v in pulls.median(0).values]


def probe_score(result: ProbeResult, default: list[float], config: ProbeConfig, num_images: int) -> float:
    """One probe's evidence in [0, 1]: its breadth beyond the top class's default pull.

    Probes that flip fewer than ``min_flips`` images say nothing either way.
    """
    if result.top_class is None or result.flip_rate * num_images < config.min_flips:
        return 0.0
    return min(1.0, max(0.0, result.breadth - default[result.top_class]))
