"""The audit plan: spec, effort, data and budget resolved into every concrete number, once.
(Over 400 lines: every default lives here beside the resolution that uses it, so one file holds every number.)

Before any work, ``plan_audit(spec, data)`` turns what the user asked for into an
immutable ``AuditPlan``: epochs, pool and test sizes, U-Net width, batch sizes,
positive-control settings, probe images and, for a model behind an API, how the
query budget splits between distillation, surrogate refits, evaluation, probes and
the label-only trigger detection on the API.
Every stage reads its numbers from the plan; the worker's progress bar, the report
(its ``plan`` section), ``refine-audit audit --plan`` and the REST dry run show the
same object. Planning needs only the data's sizes, shape and classes, so the web
process can plan without loading a model or decoding Fashion-MNIST.

A spec that cannot give a sound audit is refused here, before anything runs, with
the minimum that would work (``insufficient_query_budget``, ``invalid_spec``).
Numbers the user left to the effort level may instead be resized by a stated rule
(the API evaluation subsample, see ``auditor/pipeline/budget.py``); explicit
numbers are honoured or refused, never silently changed.

This module is also the one home of the defaults: the effort presets and the
query budget that the spec, ``ApiConfig`` and the budget split use. It imports no
stage, so ``auditor.spec`` and ``auditor.blackbox`` can read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ConfigDict, TypeAdapter, with_config

from auditor.detection.label_only import LabelOnlyConfig, images_within, queries_for
from auditor.errors import AuditError, ErrorCode
from auditor.evaluation.intervals import images_for_half_width, wilson
from auditor.evaluation.probes import ProbeConfig, build_battery
from auditor.pipeline.budget import QueryPlan, split_query_budget, surrogate_queries_for, with_detection
from auditor.pipeline.estimate import estimate_stage_seconds
from auditor.pipeline.verdict import EVALUATION_HALF_WIDTH, probe_images_floor
from auditor.refine.config import RefineConfig

if TYPE_CHECKING:
    from auditor.spec import AuditSpec

#: Every stage an audit can run, in order; checkpoint audits skip ``surrogate``.
STAGES = ("data", "load", "surrogate", "detect", "refine", "evaluate", "report")
REFINE_BATCH = RefineConfig.batch_size  # images per REFINE step; a smaller pool trains in one smaller batch
CONTROL_BATCH = 128  # images per step when training a positive-control model
#: Positive controls train every epoch of their schedule unless the spec asks for ``controls.stop_rule:
#: implanted``. A control exists to show that REFINE removes a backdoor on this data, and REFINE removes less from
#: a control stopped early: the Blended control at standard effort kept 9.9% / 11.4% ASR after REFINE (bench /
#: audit) when the rule stopped it at 1,000 steps, 3.3% at another seed's 2,000, 4.9% and 8.9% with 2x and 3x the
#: cool-down, against 1.7-4.4% on the fixed schedule (4 runs: 4 and 6 epochs, 2 seeds;
#: bench/results/control_removal/). At 11.4% the ``controls_removed`` gate (10%) made the default standard audit of
#: a backdoored model inconclusive.
#: With the rule (``auditor/attacks/training.py`` ``ImplantRule``) a control trains until the backdoor implanted:
#: held-out ASR >= CONTROL_MIN_ASR and held-out BA within CONTROL_BA_TOLERANCE of the best earlier check, checked
#: every CONTROL_CHECK_EVERY steps (8 times over a shorter cap) on CONTROL_HOLDOUT pool images the control does not train on (at most a fifth of
#: the pool). The effort's epochs stay the cap. 2,000 images put one check's BA within ~0.7 points (one standard
#: error near 90%); scoring them costs about as much as 5 training steps, 5% of the 100 steps between checks.
CONTROL_HOLDOUT = 2000
CONTROL_CHECK_EVERY = 100
CONTROL_MIN_ASR = 0.9
CONTROL_BA_TOLERANCE = 0.01
#: When the rule holds the learning rate is usually still near its peak (BadNets at standard effort: held-out BA
#: 84.9% at step 600, 91.9% after the full cosine decay of 2,724 steps, bench/results/control_implant.json), so the
#: control trains on for as many steps again with the rate falling linearly to zero, then stops. Measured there:
#: a cool-down of 0.5x ended BadNets / Blended at 900 / 750 steps with test BA 89.6% / 88.7%, 1.0x at 1,200 / 1,000
#: steps with 90.4% / 89.7% (the fixed 2,724 steps: 91.9% / 92.0%); ASR 99.7-99.9% throughout. 1.0x buys a point
#: of control BA for a third more steps, still 2.3-2.7x fewer than the fixed schedule.
CONTROL_COOLDOWN_SHARE = 1.0
MIN_CONTROL_HOLDOUT = 50  # fewer held-out images cannot tell a plateau from noise: smaller pools train the full cap
MIN_POOL_IMAGES = 2  # REFINE's contrastive loss compares images within a batch

# -- model-API audits: the query budget and how it is spent (auditor/pipeline/budget.py does the arithmetic) ----

#: Hard cap on images an audit may send to a model API when the spec names none (also ApiConfig's default).
#: 30,000 because the defaults must give a sound standard audit of a label-only API: the README's black-box example
#: run at full size with 20,000 left the surrogate 6,838 answers and came out inconclusive (agreement 94.8% of
#: 2,401, under the 95% floor; bench/results/readme_blackbox_20000.json); with 30,000 (12,838 answers) it agreed
#: on 96.6% and kept BA within 1.7 points (bench/results/readme_blackbox.json).
DEFAULT_QUERY_BUDGET = 30_000
#: Share of the surrogate's queries (distillation + refits) kept for refits on T(x) while REFINE trains.
#: 6,000 of 14,320 (0.42) kept BA within 2.5 points on all six bench/blackbox_fmnist runs; distilled once,
#: BA through the API fell 3.8-36 points.
REFIT_SHARE = 0.4
REFIT_ROUNDS = 5  # refits, after evenly spaced REFINE epochs (the bench ran 5)
#: The fewest API answers a surrogate is distilled from at quick and standard effort. Label-only agreement on clean
#: test images (bench/results/blackbox_fmnist.json): 2,000 -> 87.9%, 5,000 -> 94.6%, 7,488 trained (8,320 with
#: uncertainty selection) -> 96.1-97.4%; the 95% agreement gate is crossed near 5,700, so 6,000.
MIN_DISTILL_QUERIES = 6000
#: Thorough effort: 10,000 answers reached 97.1% (labels) and 98.1% (probabilities) on the same curve.
MIN_DISTILL_QUERIES_THOROUGH = 10_000
#: API evaluation subsample: BA measured within ±EVALUATION_HALF_WIDTH at the worst case p = 0.5 (2,401 images).
API_EVALUATION_IMAGES = images_for_half_width(EVALUATION_HALF_WIDTH)
#: The compact probe battery of API audits: 39 probes (patches of 3 and 5 px, white and checkerboard, at the four
#: corners, the centre, and all four corners at once; four noise blends at alpha 0.2 and 0.3; one warp field; rotations
#: of 20 and 30 degrees; strong noise): 40 queries per probed image with its clean answer. Its core kept every probe
#: that gave the strongest evidence in bench/results/suspicion_fmnist.json (patch3/5 at the trigger's corner, uniform
#: blends at alpha 0.2-0.3, rotations of 20-30 degrees). The four-corner patches and blend patterns 2-3 were added after
#: the zoo's first held-out half (its development split since) showed what the 31-probe core missed (label-consistent
#: and adaptive-patch triggers stamp several corners); the held-out split was built after this battery was frozen
#: (bench/results/detection_fmnist.json).
API_PROBE_BATTERY: dict[str, Any] = {
    "patch_sizes": (3, 5), "patch_fills": ("white", "checker"), "random_patches": 0, "blend_patterns": 4,
    "patch_positions": ("tl", "tr", "bl", "br", "center", "corners"),
    "blend_alphas": (0.2, 0.3), "warp_fields": 1, "warp_strengths": (1.0, 2.0), "rotations": (-30.0, -20.0, 20.0, 30.0),
    "noise_sigmas": (0.2,), "noise_draws": 1,
}
#: The defended model is probed with the submitted model's strongest probes only (see evaluate.py): API audits pay a
#: query per probe and image, so five; checkpoint audits twice the probes the score's bootstrap re-scores
#: (BOOTSTRAP_PROBES), which cuts the after-REFINE battery from 182 x 500 defended-model predictions to 20 x 500 --
#: most of a warm standard audit's evaluation (bench/results/audit_cost_inference_lever.json). The "after" score is reported, never
#: gated, and without the default-class discount it can only err high.
API_AFTER_PROBES = 5
CHECKPOINT_AFTER_PROBES = 20
#: Label-only trigger detection on the API (auditor/detection/label_only.py): halvings per boundary search.
LABEL_ONLY_SEARCH_STEPS = 8

Source = Literal["checkpoint", "api"]
_FORBID_EXTRA = ConfigDict(extra="forbid")  # plans read back from report.json are checked field by field


@dataclass(frozen=True)
class EffortPreset:
    """What an effort level costs; explicit spec fields override each number."""

    refine_epochs: int  # REFINE epochs over its pool
    refine_pool: int | None  # unlabeled images REFINE trains on; None = the whole pool
    unet_width: int  # width of T's first U-Net stage: cost grows with its square
    control_epochs: int  # training epochs of each positive-control model
    control_train_images: int | None  # labelled images a control model trains on; None = the whole pool
    probe_images: int  # test images probed on a local model (the full battery costs nothing but CPU)
    api_probe_images: int  # ... on a model API, where every probe costs one query per image
    test_images: int | None  # test images scored; None = all (API audits resize, see budget.py)
    distill_epochs: int  # surrogate training epochs (API audits)
    min_distill_queries: int  # the surrogate is never distilled from fewer API answers (budget.py)
    detect_steps: int  # trigger reverse-engineering: Adam steps per candidate class (auditor/detection/)
    detect_images: int  # ... clean pool images the masks are optimised on
    detect_holdout: int  # ... held-out test images the recovered trigger's success is measured on
    detect_batch: int  # ... clean images stamped per step and class (cost: steps x classes x batch predictions)
    # Label-only detection on a model API (auditor/detection/label_only.py). Per image and class it costs
    # LABEL_ONLY_SEARCH_STEPS + rounds x (directions + 13) queries: 473 at standard, so 10 classes x 1 image fit
    # the 5,000 the detection may take there (the share of an audit's budget). Tiny's 390 for 10 classes
    # is a smoke check of the stage: more took the surrogate of a 3,000-query tiny audit below 50% agreement.
    label_only_queries: int  # the most it may take of the query budget
    label_only_images: int  # clean images per class whose boundary is probed (fewer when the share is smaller)
    label_only_rounds: int  # HopSkipJump rounds per image
    label_only_directions: int  # random directions per gradient estimate


EFFORTS: dict[str, EffortPreset] = {
    # Seconds, for tests and smoke checks: its evidence gates trip by design, so it never gives a verdict.
    "tiny": EffortPreset(
        refine_epochs=1, refine_pool=512, unet_width=8, control_epochs=1, control_train_images=1000,
        probe_images=60, api_probe_images=30, test_images=300, distill_epochs=2, min_distill_queries=200,
        detect_steps=30, detect_images=32, detect_holdout=100, detect_batch=8,
        label_only_queries=400, label_only_images=1, label_only_rounds=1, label_only_directions=16,
    ),
    "quick": EffortPreset(
        refine_epochs=3, refine_pool=10_000, unet_width=16, control_epochs=3, control_train_images=20_000,
        probe_images=300, api_probe_images=100, test_images=5000, distill_epochs=6,
        min_distill_queries=MIN_DISTILL_QUERIES, detect_steps=100, detect_images=256, detect_holdout=300,
        detect_batch=32, label_only_queries=2500, label_only_images=1, label_only_rounds=3,
        label_only_directions=60,
    ),
    # REFINE's own defaults, chosen by bench/refine_fmnist.py (6 epochs over 20,000 images, width 16). Controls: 4
    # epochs, as bench/refine_fmnist.py trains its models; REFINE then left the Blended control 4.4% / 2.1% ASR
    # (2 seeds) against 3.6% / 1.7% after 6, for two thirds of the steps (bench/results/control_removal/).
    # Surrogate: 20 epochs. At 10, the README's label-only BadNets audit distilled a surrogate agreeing with the API
    # on 94.8% of clean test images, under SURROGATE_AGREEMENT_FLOOR (bench/results/readme_blackbox_20000.json);
    # trained again on the same 6,838 answers it agreed on 94.4% / 95.1% / 95.2% of the 10,000 test images at
    # 10 / 20 / 30 epochs, for about one more CPU minute per 10 epochs.
    "standard": EffortPreset(
        refine_epochs=RefineConfig.epochs, refine_pool=RefineConfig.pool_size,
        unet_width=16, control_epochs=4,
        control_train_images=None, probe_images=500, api_probe_images=100, test_images=None, distill_epochs=20,
        min_distill_queries=MIN_DISTILL_QUERIES, detect_steps=300, detect_images=512, detect_holdout=500,
        detect_batch=32, label_only_queries=5000, label_only_images=1, label_only_rounds=5,
        label_only_directions=80,
    ),
    "thorough": EffortPreset(
        refine_epochs=12, refine_pool=None, unet_width=32, control_epochs=10, control_train_images=None,
        # 180 API probe images (18 per class) keep thorough within DEFAULT_QUERY_BUDGET with the 39-probe battery.
        probe_images=1000, api_probe_images=180, test_images=None, distill_epochs=30,
        min_distill_queries=MIN_DISTILL_QUERIES_THOROUGH, detect_steps=500, detect_images=1000, detect_holdout=1000,
        detect_batch=32, label_only_queries=10_000, label_only_images=2, label_only_rounds=5,
        label_only_directions=80,
    ),
}


@dataclass(frozen=True)
class DataSummary:
    """What planning needs to know about the data: sizes, shape and classes, not the images."""

    source: Literal["fashion-mnist", "upload"]
    pool_images: int  # images available to the unlabeled pool (REFINE, controls, distillation)
    test_images: int  # images available to the labelled test split
    image_shape: tuple[int, int, int]  # C, H, W
    num_classes: int | None  # None: unlabelled data; model.architecture.num_classes must say
    labelled: bool


#: The built-in data set: its sizes are known, so planning never decodes it.
FASHION_MNIST = DataSummary("fashion-mnist", 60_000, 10_000, (1, 28, 28), 10, True)


def test_split_size(images: int, test_fraction: float) -> int:
    """Test images held out of an upload: the same arithmetic in the plan and in the data stage."""
    return min(images, max(1, int(round(images * test_fraction))))


def upload_summary(images: int, image_shape: tuple[int, int, int], num_classes: int | None, labelled: bool,
                   test_fraction: float) -> DataSummary:
    """An uploaded data set as the plan sees it, split by ``data.test_fraction``."""
    n_test = test_split_size(images, test_fraction)
    return DataSummary("upload", images - n_test, n_test, tuple(image_shape), num_classes, labelled)  # type: ignore[arg-type]


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class DataPlan:
    source: str
    pool_images: int  # loaded for REFINE, positive controls and distillation
    test_images: int  # scored: BA, agreement, ASR of the controls, probes are drawn from them
    test_available: int
    stratified: bool  # a class-stratified subsample of the test split (the API evaluation rule)
    image_shape: tuple[int, int, int]
    num_classes: int


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class RefinePlan:
    epochs: int
    pool_images: int
    unet_width: int
    batch_size: int
    loss: str
    overlay: float = 0.0  # RefineConfig.overlay; absent from plans before it existed


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class SurrogatePlan:
    """API audits: the local model REFINE trains through, distilled and refitted from the API's answers."""

    architecture: str
    distill_queries: int
    distill_epochs: int
    refit_queries: int  # on T(x) while REFINE trains; 0 for one-epoch runs, which have no later epoch to help
    refit_rounds: int


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class ProbePlan:
    images: int  # test images each probe is applied to
    battery: Literal["full", "api"]  # api: the compact battery (each probe costs a query per image)
    probes: int  # probes in the battery
    after_probes: int  # the submitted model's strongest probes, applied to the defended model
    min_images: int  # fewer images trip the probe-evidence gate


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class DetectionPlan:
    """Trigger reverse-engineering (auditor/detection/): a mask and pattern per class, on the model or its surrogate."""

    model: Literal["submitted", "surrogate"]  # API audits search the distilled surrogate: it needs gradients
    steps: int  # Adam steps per candidate class
    images: int  # clean pool images the masks are optimised on
    batch_size: int  # clean images per step and class
    holdout_images: int  # held-out test images (not of the suspected class) the recovered trigger is measured on


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class LabelOnlyPlan:
    """API audits: label-only trigger detection on the API itself (auditor/detection/label_only.py).

    Reported beside the verdict, never in it: it has not been calibrated on the zoo.
    ``queries`` is what the search may send at most (``QueryPlan.detection``).
    """

    queries: int
    images_per_class: int
    rounds: int  # HopSkipJump rounds per image
    directions: int  # random directions per gradient estimate
    search_steps: int  # halvings per boundary search


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class ControlsPlan:
    """Each control trains ``epochs`` over ``train_images``, or until its backdoor implanted (``stop_rule``)."""

    attacks: tuple[str, ...]
    target: int
    epochs: int  # the cap: a control stopped by the rule trains fewer (the report gives its steps)
    train_images: int
    batch_size: int
    # Defaults describe plans read back from reports written before the rule existed (a fixed schedule).
    stop_rule: Literal["implanted", "fixed"] = "fixed"
    max_steps: int = 0  # epochs x steps per epoch: the cap in optimizer steps
    holdout_images: int = 0  # pool images, disjoint from train_images, the rule is checked on
    check_every: int = 0  # steps between checks
    min_asr: float = CONTROL_MIN_ASR  # held-out ASR the backdoor must reach
    ba_tolerance: float = CONTROL_BA_TOLERANCE  # BA plateau: within this of the best earlier check
    cooldown_share: float = 0.0  # after the rule held: this share of the steps taken again, with a decaying rate


@with_config(_FORBID_EXTRA)
@dataclass(frozen=True)
class AuditPlan:
    """Every number an audit runs with; built by ``plan_audit`` and never changed afterwards."""

    effort: str
    source: Source
    device: str
    bf16: bool  # bf16 autocast for every training run (REFINE, controls, surrogate)
    seed: int
    stages: tuple[str, ...]
    data: DataPlan
    refine: RefinePlan
    probes: ProbePlan
    controls: ControlsPlan
    detection: DetectionPlan | None = None  # None only in plans read back from reports written before it existed
    label_only: LabelOnlyPlan | None = None  # API audits whose budget pays for it (None: checkpoint, or skipped)
    surrogate: SurrogatePlan | None = None
    queries: QueryPlan | None = None
    estimate_seconds: dict[str, float] = field(default_factory=dict)  # per stage, from measured rates (estimate.py)
    notes: tuple[str, ...] = ()  # resizing decisions and gates the plan already knows will trip

    @property
    def total_seconds(self) -> float:
        return sum(self.estimate_seconds.values())

    def stage_weights(self) -> dict[str, float]:
        """Each stage's share of the estimated run time: the worker's progress-bar weights."""
        total = self.total_seconds or 1.0
        return {stage: self.estimate_seconds.get(stage, 0.0) / total for stage in self.stages}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists): what report.json and the REST dry run hold."""
        return TypeAdapter(AuditPlan).dump_python(self, mode="json")


def plan_audit(spec: AuditSpec, data: DataSummary, *, device: str | torch.device = "cpu") -> AuditPlan:
    """Resolve ``spec`` against ``data``; raises ``AuditError`` (a 4xx code) when no sound plan exists."""
    preset = EFFORTS[spec.effort]
    device = torch.device(device)
    num_classes = _num_classes(spec, data)
    _check_architecture(spec, data)
    data_plan = _data_plan(spec, data, preset, num_classes)
    refine = _refine_plan(spec, preset, data_plan)
    probes = _probe_plan(spec, preset, data_plan)
    controls = _controls_plan(spec, preset, data_plan)
    detection = _detection_plan(spec, preset, data_plan)
    bf16 = _bf16(spec, device)
    surrogate = queries = None
    notes = list(_data_notes(spec, data_plan))
    label_only = None
    if spec.model.source == "api":
        shape = _label_only_shape(preset, spec.seed)
        wanted = preset.label_only_queries if spec.model.api.label_only_detection else 0
        queries = split_query_budget(
            budget=spec.model.api.query_budget, evaluation_images=data_plan.test_images,
            probe_images=probes.images, probe_queries_per_image=probes.probes + probes.after_probes + 2,
            pool_images=data_plan.pool_images, min_distill=preset.min_distill_queries,
            refit_share=REFIT_SHARE if refine.epochs > 1 else 0.0, effort=spec.effort,
            detection_wanted=wanted, detection_floor=_label_only_floor(shape, num_classes, wanted),
        )
        label_only, queries = _label_only_plan(shape, num_classes, queries, refit_share=REFIT_SHARE
                                               if refine.epochs > 1 else 0.0, pool_images=data_plan.pool_images)
        spare = queries.budget - queries.evaluation - queries.probes - surrogate_queries_for(
            min(preset.min_distill_queries, data_plan.pool_images), REFIT_SHARE if refine.epochs > 1 else 0.0)
        notes += _label_only_notes(label_only, shape, num_classes, wanted, spare) if wanted else []
        surrogate = SurrogatePlan(
            architecture=(spec.model.architecture.name if spec.model.architecture else "small_cnn"),
            distill_queries=queries.distillation, distill_epochs=preset.distill_epochs,
            refit_queries=queries.refits, refit_rounds=REFIT_ROUNDS if queries.refits else 0,
        )
    notes += _probe_notes(probes, num_classes)
    stages = tuple(s for s in STAGES if s != "surrogate" or spec.model.source == "api")
    estimate = estimate_stage_seconds(
        stages=stages, data=data_plan, refine=refine, probes=probes, controls=controls, surrogate=surrogate,
        queries=queries, bf16=bf16, device=device.type, detection=detection,
    )
    return AuditPlan(
        effort=spec.effort, source=spec.model.source, device=device.type, bf16=bf16, seed=spec.seed, stages=stages,
        data=data_plan, refine=refine, probes=probes, controls=controls, detection=detection, label_only=label_only,
        surrogate=surrogate, queries=queries, estimate_seconds=estimate, notes=tuple(notes),
    )


# -- pieces ------------------------------------------------------------------------------------------------------


def _num_classes(spec: AuditSpec, data: DataSummary) -> int:
    declared = spec.model.architecture.num_classes if spec.model.architecture else None
    if declared is not None and data.num_classes is not None and declared < data.num_classes:
        raise _spec_error("model.architecture.num_classes",
                          f"is {declared}, but the data has {data.num_classes} classes")
    known = declared or data.num_classes
    if known is None:
        raise _spec_error("model.architecture.num_classes",
                          "required for unlabelled data: the number of classes is unknown")
    return known


def _check_architecture(spec: AuditSpec, data: DataSummary) -> None:
    """What the spec says about the model must fit the data's images, or nothing could run."""
    arch = spec.model.architecture
    if arch is None:
        return
    channels = data.image_shape[0]
    if arch.in_channels is not None and arch.in_channels != channels:
        raise _spec_error("model.architecture.in_channels", f"is {arch.in_channels}, but the images have {channels}")
    for name in ("mean", "std"):
        values = getattr(arch, name)
        if values is not None and len(values) != channels:
            raise _spec_error(f"model.architecture.{name}", f"needs one value per channel ({channels})")
    if arch.std is not None and any(v <= 0 for v in arch.std):
        raise _spec_error("model.architecture.std", "values must be positive")


def _data_plan(spec: AuditSpec, data: DataSummary, preset: EffortPreset, num_classes: int) -> DataPlan:
    cap = spec.data.train_size or _largest(preset.refine_pool, preset.control_train_images)
    pool = data.pool_images if cap is None else min(data.pool_images, cap)
    if pool < MIN_POOL_IMAGES or data.test_images < 1:
        raise AuditError(
            ErrorCode.INVALID_DATASET,
            f"The data leaves {pool} pool and {data.test_images} test images; an audit needs at least "
            f"{MIN_POOL_IMAGES} and 1 (lower data.test_fraction or upload more images).",
            {"pool_images": pool, "test_images": data.test_images},
        )
    requested = spec.data.test_size or preset.test_images
    test = data.test_images if requested is None else min(data.test_images, requested)
    resized = spec.model.source == "api" and spec.data.test_size is None
    if resized:
        test = min(test, API_EVALUATION_IMAGES)
    return DataPlan(
        source=data.source, pool_images=pool, test_images=test, test_available=data.test_images,
        stratified=resized and test < data.test_images, image_shape=tuple(data.image_shape),
        num_classes=num_classes,
    )


def _largest(*caps: int | None) -> int | None:
    return None if any(c is None for c in caps) else max(c for c in caps if c is not None)


def _refine_plan(spec: AuditSpec, preset: EffortPreset, data: DataPlan) -> RefinePlan:
    r = spec.refine
    pool = min(data.pool_images, r.pool_size or preset.refine_pool or data.pool_images)
    return RefinePlan(
        epochs=r.epochs or preset.refine_epochs, pool_images=pool, unet_width=r.unet_width or preset.unet_width,
        batch_size=min(REFINE_BATCH, pool), loss=r.loss,
        overlay=RefineConfig.overlay if r.overlay is None else r.overlay,  # off unless asked: see RefineConfig
    )


def _probe_plan(spec: AuditSpec, preset: EffortPreset, data: DataPlan) -> ProbePlan:
    api = spec.model.source == "api"
    wanted = spec.probes.images or (preset.api_probe_images if api else preset.probe_images)
    probes = _battery_size(api, data.image_shape)
    return ProbePlan(images=min(wanted, data.test_images), battery="api" if api else "full", probes=probes,
                     after_probes=min(API_AFTER_PROBES if api else CHECKPOINT_AFTER_PROBES, probes),
                     min_images=probe_images_floor(data.num_classes))


@functools.cache
def _battery_size(api: bool, image_shape: tuple[int, int, int]) -> int:
    return len(build_battery(probe_config(api), image_shape))


def probe_config(api: bool, images: int = 1, seed: int = 0) -> ProbeConfig:
    """The probe battery of a checkpoint audit (the full one) or of an API audit (API_PROBE_BATTERY)."""
    return ProbeConfig(num_images=max(1, images), seed=seed, **(API_PROBE_BATTERY if api else {}))


def _controls_plan(spec: AuditSpec, preset: EffortPreset, data: DataPlan) -> ControlsPlan:
    c = spec.controls
    if c.attacks and c.target >= data.num_classes:
        raise _spec_error("controls.target", f"{c.target} is not a class of this data (0..{data.num_classes - 1})")
    cap = spec.data.train_size or preset.control_train_images
    holdout = min(CONTROL_HOLDOUT, data.pool_images // 5) if c.stop_rule == "implanted" else 0
    holdout = holdout if holdout >= MIN_CONTROL_HOLDOUT else 0
    available = data.pool_images - holdout
    train = available if cap is None else min(available, cap)
    epochs, batch = c.train_epochs or preset.control_epochs, min(CONTROL_BATCH, train)
    max_steps = epochs * -(-train // batch)
    return ControlsPlan(attacks=tuple(c.attacks), target=c.target, epochs=epochs, train_images=train,
                        batch_size=batch, stop_rule="implanted" if holdout else "fixed", max_steps=max_steps,
                        holdout_images=holdout, check_every=max(1, min(CONTROL_CHECK_EVERY, max_steps // 8)),
                        cooldown_share=CONTROL_COOLDOWN_SHARE if holdout else 0.0)


def _detection_plan(spec: AuditSpec, preset: EffortPreset, data: DataPlan) -> DetectionPlan:
    """Its sizes scale with the effort; it costs no API query (API audits search the surrogate)."""
    images = min(preset.detect_images, data.pool_images)
    return DetectionPlan(
        model="surrogate" if spec.model.source == "api" else "submitted", steps=preset.detect_steps, images=images,
        batch_size=min(preset.detect_batch, images), holdout_images=min(preset.detect_holdout, data.test_images),
    )


def _label_only_shape(preset: EffortPreset, seed: int) -> LabelOnlyConfig:
    """The label-only search at an effort level, costed here; the detect stage runs what the plan records."""
    return LabelOnlyConfig(images_per_class=preset.label_only_images,
                           iterations=preset.label_only_rounds, directions=preset.label_only_directions,
                           search_steps=LABEL_ONLY_SEARCH_STEPS, seed=seed)


def _label_only_floor(shape: LabelOnlyConfig, num_classes: int, wanted: int) -> int:
    """One image per class: the smallest run worth its queries (0 when even that exceeds the share ``wanted``)."""
    floor = queries_for(num_classes, 1, shape)
    return floor if floor <= wanted else 0


def _label_only_plan(shape: LabelOnlyConfig, num_classes: int, queries: QueryPlan, *, refit_share: float,
                     pool_images: int) -> tuple[LabelOnlyPlan | None, QueryPlan]:
    """Whole images per class within the reserved share; what rounding leaves goes back to the surrogate."""
    images = images_within(queries.detection, num_classes, shape)
    if images == 0:
        return None, with_detection(queries, 0, refit_share, pool_images)
    used = queries_for(num_classes, images, shape)
    plan = LabelOnlyPlan(queries=used, images_per_class=images, rounds=shape.iterations,
                         directions=shape.directions, search_steps=shape.search_steps)
    return plan, with_detection(queries, used, refit_share, pool_images)


def _label_only_notes(plan: LabelOnlyPlan | None, shape: LabelOnlyConfig, num_classes: int, wanted: int,
                      spare: int) -> list[str]:
    """What the plan says about the label-only detection: its cost, or why it is skipped (``spare``: the queries
    above the minimum audit)."""
    if plan is not None:
        return [f"Label-only trigger detection on the API: {plan.queries:,} queries ({plan.images_per_class} image(s) "
                "per class); reported beside the verdict, not in it (not yet calibrated)."]
    floor = queries_for(num_classes, 1, shape)
    if floor > wanted:
        return [f"No label-only trigger detection: one image for each of {num_classes} classes costs {floor:,} "
                f"queries, over the {wanted:,} this effort gives it."]
    return [f"No label-only trigger detection: it needs {floor:,} queries beyond the minimum audit; raise "
            f"model.api.query_budget by {floor - spare:,} or more to run it."]


def _bf16(spec: AuditSpec, device: torch.device) -> bool:
    """bf16 autocast where the CPU computes it natively: ~1.5x faster CNNs, ~2x the U-Net (auditor/runtime.py)."""
    from auditor.runtime import cpu_bf16_pays

    return cpu_bf16_pays(device) if spec.refine.bf16 is None else spec.refine.bf16


def _data_notes(spec: AuditSpec, data: DataPlan) -> list[str]:
    notes = []
    if data.stratified:
        sized = (f", the {API_EVALUATION_IMAGES:,} that measure BA within ±{100 * EVALUATION_HALF_WIDTH:.0f} points"
                 if data.test_images == API_EVALUATION_IMAGES else "")
        notes.append(f"Evaluation on a stratified subsample of {data.test_images:,} of {data.test_available:,} test "
                     f"images{sized} (2 queries each).")
    worst = _worst_half_width(data.test_images)
    if worst > EVALUATION_HALF_WIDTH:
        notes.append(
            f"BA is measured on {data.test_images:,} test images (up to ±{100 * worst:.1f} points); above "
            f"±{100 * EVALUATION_HALF_WIDTH:.0f} points the evaluation gate makes the verdict inconclusive."
        )
    return notes


def _worst_half_width(n: int) -> float:
    return wilson(n // 2, n).half_width


def _probe_notes(probes: ProbePlan, num_classes: int) -> list[str]:
    if probes.images >= probes.min_images:
        return []
    return [f"Probes run on {probes.images} images, fewer than the {probes.min_images} ({num_classes} classes) the "
            "probe-evidence gate needs: the verdict will be inconclusive."]


def _spec_error(field_path: str, message: str) -> AuditError:
    return AuditError(ErrorCode.INVALID_SPEC, f"{field_path}: {message}",
                      {"fields": [{"field": field_path, "message": message}]})

