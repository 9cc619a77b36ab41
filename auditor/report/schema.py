"""The ``report.json`` contract: pydantic models, validation and the exported JSON Schema.
(Over 400 lines: the whole report.json contract, one model per section, kept in one file to read as one document.)

``report.json`` is what the REST API serves, what the web portal and the HTML/PDF
renderers read, and what downstream pipelines parse, so it is versioned
(``schema_version``) and validated before it is written. The pydantic models are
authoritative: they also check cross-field rules (lengths that must equal the
number of classes, the label mapping being a derangement) that the exported JSON
Schema, which is structural, cannot express.

Run ``python -m auditor.report`` to regenerate ``docs/report.schema.json``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from auditor.pipeline.plan import AuditPlan
from auditor.pipeline.verdict import Fitness, Gate

#: 2.0: verdict.level gained "inconclusive", succeeded reports need plan, gates, defended_model and figures
#: (docs/report-schema.md has the migration note). 2.1 added the optional ``detection`` section,
#: ``verdict.trigger_evidence``, ``plan.detection`` and ``positive_controls[].origin`` / ``.cache``;
#: 2.0 reports still validate. 2.2 added ``positive_controls[].training`` (steps trained, the stopping rule and the
#: held-out BA/ASR it ended with) and the plan's ``controls.stop_rule`` with its thresholds and cool-down.
#: 2.3 added ``verdict.combined``: the combined detection score (probes + trigger search), its meaning, level and
#: thresholds; on checkpoint audits it sets the level. 2.0, 2.1 and 2.2 reports still validate.
#: 2.4 added ``detection.label_only`` (label-only trigger detection on a model API, not calibrated, outside the
#: verdict), ``plan.label_only`` and ``plan.queries.detection``; 2.0 to 2.3 reports still validate.
#: 2.5 added ``detection.agrees_with_probes``: a recovered trigger counts only toward the class the probes suspect.
#: 2.6 added ``plan.refine.overlay``: how strongly T's training images were blended with other pool images.
SCHEMA_VERSION = "2.6"
DOCS_SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"

#: A share of images in [0, 1]: accuracies, ASR, RA, agreement, flip rates, scores.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]
Count = Annotated[int, Field(ge=0)]
ClassIndex = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
#: A PNG beside report.json; a bare file name so rendering never reads outside the report folder.
PngName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$", max_length=200)]

Status = Literal["succeeded", "failed", "cancelled"]
ProbeLevel = Literal["likely_backdoored", "suspicious", "no_evidence"]
VerdictLevel = Literal["likely_backdoored", "suspicious", "no_evidence", "inconclusive"]


class _Model(BaseModel):
    """Strict base: unknown keys are typos in a contract, and NaN/inf cannot be written as JSON."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ReportValidationError(ValueError):
    """A report dict that does not satisfy the contract; the message lists every problem by path."""

    def __init__(self, error: ValidationError):
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()]
        super().__init__(f"invalid report ({error.error_count()} problem(s)):\n" + "\n".join(lines))
        self.errors = error.errors()


class CombinedScore(_Model):
    """The probes and the trigger search in one number (auditor/detection/combined.py): a calibrated probability."""

    score: Fraction  # P(targeted backdoor) for models like the calibration zoo; see meaning
    level: ProbeLevel  # the score's reading, lifted to suspicious by a recovered trigger
    score_level: ProbeLevel  # the score's reading alone
    meaning: Annotated[str, Field(min_length=1, max_length=400)]
    likely_threshold: Fraction  # score at or above: likely_backdoored
    suspicious_threshold: Fraction  # score at or above: suspicious
    fitted_by: str  # the benchmark run the coefficients and thresholds come from

    @model_validator(mode="after")
    def _ordered(self) -> CombinedScore:
        if self.suspicious_threshold > self.likely_threshold:
            raise ValueError("the suspicious threshold cannot exceed the likely_backdoored one")
        return self


class Verdict(_Model):
    """The one-line answer. The score is evidence from probe triggers, not proof of a backdoor."""

    level: VerdictLevel  # inconclusive: an evidence gate tripped (see gates); reason says which
    headline: Annotated[str, Field(min_length=1, max_length=400)]
    reason: str | None = None  # the first tripped gate, in one sentence
    probe_level: ProbeLevel  # what the suspicion score alone reads, gates aside
    suspicion_before: Fraction  # n and 95% interval in figures.suspicion_before
    suspicion_after: Fraction
    #: True: trigger reverse-engineering on the submitted model recovered a trigger (detection.recovered), so the
    #: level is not no_evidence; False: it ran and found none that counts; None: it did not run (2.0 reports).
    trigger_evidence: bool | None = None
    #: Checkpoint audits whose trigger search ran: the combined score, which sets the level. None: API audits (the
    #: level is the probe score's), audits without a search, and reports before 2.2.
    combined: CombinedScore | None = None

    @model_validator(mode="after")
    def _reason_for_inconclusive(self) -> Verdict:
        if (self.level == "inconclusive") != (self.reason is not None):
            raise ValueError("an inconclusive verdict, and only that, carries a reason")
        if self.trigger_evidence and self.level == "no_evidence":
            raise ValueError("a recovered trigger never coexists with no_evidence")
        return self


class Figure(_Model):
    """A headline number with the images behind it and its 95% interval (Wilson for shares, bootstrap for scores)."""

    value: Fraction
    n: Count
    low: Fraction
    high: Fraction

    @model_validator(mode="after")
    def _ordered(self) -> Figure:
        if not self.low <= self.value <= self.high:
            raise ValueError(f"interval [{self.low}, {self.high}] does not hold the value {self.value}")
        return self


class Software(_Model):
    refine_audit: str
    torch: str
    torchvision: str | None = None
    python: str
    device: str

    @classmethod
    def current(cls, device: str) -> Software:
        """Versions of the running process, so a report says exactly what produced it."""
        import torch
        import torchvision

        from auditor import __version__

        return cls(
            refine_audit=__version__,
            torch=torch.__version__,
            torchvision=torchvision.__version__,
            python=f"{platform.python_version()} ({sys.platform})",
            device=device,
        )


class ModelInput(_Model):
    source: Literal["checkpoint", "api"]
    format: str  # e.g. torchscript | safetensors | state_dict | kserve_v1 | oip_v2 | template
    sha256: Sha256 | None = None
    url: str | None = None  # without credentials: the report is shared more widely than the audit
    architecture: str | None = None

    @model_validator(mode="after")
    def _identified(self) -> ModelInput:
        if self.source == "checkpoint" and self.sha256 is None:
            raise ValueError("a checkpoint model must be identified by its sha256")
        if self.source == "api" and not self.url:
            raise ValueError("an API model must be identified by its url")
        return self


class DataInput(_Model):
    source: str  # e.g. fashion_mnist | upload
    sha256: Sha256 | None = None
    pool_size: Count  # unlabeled benign images REFINE trained on
    test_size: Count
    image_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]  # C, H, W
    num_classes: Annotated[int, Field(ge=2)]
    class_names: list[str]

    @model_validator(mode="after")
    def _names_per_class(self) -> DataInput:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries, num_classes is {self.num_classes}")
        return self


class Inputs(_Model):
    model: ModelInput
    data: DataInput | None = None  # absent only when the audit failed before loading data


class Timings(_Model):
    stages: dict[str, Seconds] = Field(default_factory=dict)  # load, data, surrogate, refine, evaluate, report, ...
    total: Seconds


class AgreementPoint(_Model):
    queries: Count
    agreement: Fraction


class Queries(_Model):
    """Cost of a black-box audit: what the model API was asked, and how well the surrogate learned from it."""

    queries_used: Count  # images sent to the API (a request may carry several)
    budget: Count | None = None
    requests: Count
    seconds: Seconds
    cache_hits: Count = 0
    agreement_curve: list[AgreementPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _within_budget(self) -> Queries:
        if self.budget is not None and self.queries_used > self.budget:
            raise ValueError(f"queries_used {self.queries_used} exceeds budget {self.budget}")
        return self


class SurrogateEpoch(_Model):
    epoch: Count
    loss: float
    agreement: Fraction | None = None
    seconds: Seconds | None = None


class SurrogateRefit(_Model):
    """One refit of the surrogate on the API's answers to transformed images, during REFINE."""

    epoch: Count  # the REFINE epoch it followed
    queries: Count
    agreement_before: Fraction  # surrogate vs API on those transformed images, before fine-tuning
    agreement_after: Fraction


class Surrogate(_Model):
    architecture: str
    agreement_clean: Fraction  # the distilled surrogate vs the API on the evaluation's clean test images
    agreement_images: Count | None = None  # how many
    agreement_triggered: Fraction | None = None  # ... and on probe-triggered images
    history: list[SurrogateEpoch] = Field(default_factory=list)
    refits: list[SurrogateRefit] = Field(default_factory=list)


class RefineEpoch(_Model):
    epoch: Count
    loss: float
    ce: float  # the classification term (BCE or CE on the remapped probabilities)
    supcon: float  # the supervised-contrastive term, before multiplying by lambda
    seconds: Seconds
    lr: Annotated[float, Field(ge=0.0)]


class ExportCheck(_Model):
    """A reloaded export compared with the in-memory defended model."""

    images: Count
    agreement: Fraction  # top-1 agreement with the in-memory defended model
    max_abs_diff: Annotated[float, Field(ge=0.0)]  # largest difference of an output value
    passed: bool


class DefenseExport(_Model):
    """One file format of the defended model (checkpoint audits) and whether it was verified."""

    format: Literal["torch_export", "onnx", "torchscript"]
    name: str
    sha256: Sha256 | None = None  # None when the format could not be produced
    verified: bool
    deprecated: bool = False  # TorchScript: still loads, but torch warns users off it
    check: ExportCheck | None = None
    error: str | None = None  # why the format is missing or failed its check


class Refine(_Model):
    config: dict[str, Any]
    mapping: list[ClassIndex]  # M: when f(T(x)) says class j, the defended model says mapping[j]
    history: list[RefineEpoch] = Field(default_factory=list)
    seconds: Seconds
    exports: list[DefenseExport] = Field(default_factory=list)  # checkpoint audits: the defended model's files

    @model_validator(mode="after")
    def _derangement(self) -> Refine:
        k = len(self.mapping)
        if sorted(self.mapping) != list(range(k)):
            raise ValueError("mapping must be a permutation of 0..K-1")
        if any(src == dst for src, dst in enumerate(self.mapping)):
            raise ValueError("mapping must be a derangement (no class maps to itself)")
        return self


class Utility(_Model):
    """What the defense costs on clean data; BA is null when the test split has no labels."""

    ba_before: Fraction | None = None
    ba_after: Fraction | None = None
    agreement: Fraction  # defended vs original, top-1, on clean test images
    per_class_accuracy_before: list[Fraction | None] | None = None  # None: the class is absent from the test split
    per_class_accuracy_after: list[Fraction | None] | None = None
    confusion_after: list[list[Count]] | None = None  # rows: true class, columns: defended prediction
    test_images: Count | None = None  # clean test images all of the above are measured on
    predictions_before: list[Count] | None = None  # per class: how many test images the submitted model assigns it
    predictions_after: list[Count] | None = None  # ... the defended model (a collapsing model piles them up)


class ProbeEvidence(_Model):
    probe: str  # e.g. patch-3x3-br-white
    family: str  # e.g. patch | blend | warp | noise
    flip_rate: Fraction  # share of test images whose prediction changed under the probe
    top_class: ClassIndex | None = None  # the class that captured most flips (None: no flips)
    concentration: Fraction  # share of flips that went to top_class


class ProbeResult(_Model):
    score: Fraction  # suspicion score: high when some probe sends many flips to one class
    evidence: list[ProbeEvidence] = Field(default_factory=list)
    family_scores: dict[str, Fraction] = Field(default_factory=dict)  # the score restricted to each family
    suspected_target: ClassIndex | None = None
    images: Count | None = None  # test images each probe was applied to


class Probes(_Model):
    before: ProbeResult  # the submitted model
    after: ProbeResult  # the defended model M o f o T (through the real API for black-box audits)


class AttackMetrics(_Model):
    ba: Fraction
    asr: Fraction
    ra: Fraction


CacheKey = Annotated[str, Field(pattern=r"^[0-9a-f]{32}/[0-9a-f]{32}/(control|refine-[0-9a-f]{32})$")]


class ControlCacheRecord(_Model):
    """Where a positive control lives in the control cache, and who put it there."""

    key: CacheKey  # the control model's entry
    refine_key: CacheKey  # its REFINE defense with this audit's settings
    refine_origin: Literal["trained", "reused"]
    created_by: Annotated[str, Field(max_length=128)]  # the audit that trained the control ("" if unknown)
    created_at: Annotated[str, Field(max_length=64)]
    rejected: list[Annotated[str, Field(max_length=600)]] = Field(default_factory=list)  # entries found invalid


class ControlTraining(_Model):
    """How long a control trained: its whole schedule, or until its backdoor implanted (plan.controls.stop_rule)."""

    steps: Count  # optimizer steps the control model trained
    max_steps: Count  # the cap (plan.controls.epochs over its training images)
    stop_rule: Literal["implanted", "fixed"]
    stopped_early: bool  # the rule held before the cap
    holdout_images: Count  # held-out pool images the rule was checked on (0: fixed schedule)
    holdout_ba: Fraction | None = None  # of the model training ended with (None: no check ran)
    holdout_asr: Fraction | None = None


class PositiveControl(_Model):
    """A backdoored reference model the service trained itself, defended with the same REFINE config."""

    attack: Annotated[str, Field(min_length=1, max_length=120)]
    target: ClassIndex
    poison_rate: Fraction
    no_defense: AttackMetrics
    refine: AttackMetrics
    train_seconds: Seconds
    refine_seconds: Seconds
    test_images: Count | None = None  # clean test images behind BA
    triggered_images: Count | None = None  # triggered test images outside the target class, behind ASR and RA
    origin: Literal["trained", "reused"] = "trained"  # reused: from the control cache, re-scored on this audit's images
    cache: ControlCacheRecord | None = None  # None: not cached (no cache, or pseudo-labelled data)
    training: ControlTraining | None = None  # None in reports before 2.2


class LabelOnlyDetection(_Model):
    """Label-only trigger detection on a model API (auditor/detection/label_only.py), in the spirit of AEVA.

    Per class, label-only estimates of the decision boundary's normal near held-out images, aggregated into a map;
    a backdoor's target hinges on the trigger's few pixels, so its map peaks. Not calibrated on the model zoo:
    reported beside the verdict, never in it (``calibrated`` and ``counts_toward_verdict`` are false).
    """

    method: Literal["aeva-peak"]
    calibrated: Literal[False]
    counts_toward_verdict: Literal[False]
    suspected_class: ClassIndex  # the class with the highest peak
    anomaly_index: Annotated[float, Field(ge=0.0)]  # MAD anomaly index of its peak (robust SDs above the median)
    peaks: list[Annotated[float, Field(ge=0.0)]]  # per class: the map's largest window mean over its mean (1: flat)
    anomaly_indices: list[float]  # per class (positive: a sharper peak than typical)
    peak_pixels: list[Annotated[list[Count], Field(min_length=2, max_length=2)]]  # per class: (row, col) of the peak
    images: list[Count]  # per class: images whose boundary was estimated
    images_per_class: Annotated[int, Field(ge=1)]
    rounds: Annotated[int, Field(ge=1)]  # HopSkipJump rounds per image
    directions: Annotated[int, Field(ge=1)]  # random directions per estimate
    search_steps: Annotated[int, Field(ge=1)]
    queries: Count  # images sent to the API (answers the client had cached count too)
    query_cap: Count  # the plan's reservation, never exceeded
    seconds: Seconds
    image: PngName | None = None  # the per-class maps, beside report.json

    @model_validator(mode="after")
    def _within_cap(self) -> LabelOnlyDetection:
        if self.queries > self.query_cap:
            raise ValueError("label_only.queries exceeds its query_cap")
        return self


class Detection(_Model):
    """Trigger reverse-engineering: per class, the smallest mask and pattern that send clean images there.

    A backdoor target needs a far smaller mask than any other class; the anomaly index says how far (MAD-based,
    robust standard deviations below the median). Blind to triggers that are not a fixed stamp (e.g. WaNet warps,
    sample-specific triggers) and to triggers larger than a normal class's mask.
    """

    model: Literal["submitted", "surrogate"]  # API audits search the distilled surrogate (no API query)
    suspected_class: ClassIndex  # the class with the smallest mask
    anomaly_index: Annotated[float, Field(ge=0.0)]
    anomaly_threshold: Annotated[float, Field(gt=0.0)]  # flagged at or above it ...
    norm_ratio: Annotated[float, Field(ge=0.0)]  # the suspected mask's norm over the median class's
    max_norm_ratio: Annotated[float, Field(gt=0.0)]  # ... and at or below this (guards the MAD with few classes)
    flagged: bool
    success: Figure  # the recovered trigger on held-out clean images not of suspected_class: share sent there
    success_floor: Fraction
    max_mask_fraction: Fraction  # a mask covering more of the image is no small trigger
    recovered: bool  # flagged, mask_fraction <= max_mask_fraction and success.value >= success_floor
    counts_toward_verdict: bool  # recovered on the submitted model, probes agreeing: the level is not no_evidence
    #: Whether the probe battery's suspected class is suspected_class (2.5; None in older reports). A small CNN has
    #: universal patches toward an "easy" class that the search recovers like a trigger; a backdoor's trigger search
    #: and probes name the same class (bench/results/detection_fmnist.json).
    agrees_with_probes: bool | None = None
    mask_norms: list[Annotated[float, Field(ge=0.0)]]  # per class: L1 norm of the best mask, in pixels
    anomaly_indices: list[float]  # per class (positive: smaller mask than typical)
    reached: list[bool] = Field(default_factory=list)  # per class: whether any mask reached the search's target
    mask_fraction: Fraction  # the suspected mask's L1 norm as a share of the image area
    steps: Count  # Adam steps per class
    images: Count  # clean images optimised on
    seconds: Seconds
    image: PngName | None = None  # mask, pattern and triggered examples, beside report.json
    label_only: LabelOnlyDetection | None = None  # API audits whose plan reserved its queries (2.4)

    @model_validator(mode="after")
    def _consistent(self) -> Detection:
        if self.flagged != (self.anomaly_index >= self.anomaly_threshold and self.norm_ratio <= self.max_norm_ratio):
            raise ValueError("flagged must say whether anomaly_index reaches anomaly_threshold within max_norm_ratio")
        small = self.mask_fraction <= self.max_mask_fraction
        if self.recovered != (self.flagged and small and self.success.value >= self.success_floor):
            raise ValueError("recovered must say whether the flagged, small trigger reaches success_floor")
        corroborated = self.agrees_with_probes is not False  # reports before 2.5 do not say
        if self.counts_toward_verdict != (self.recovered and self.model == "submitted" and corroborated):
            raise ValueError("only a trigger recovered on the submitted model, toward the class the probes suspect, "
                             "counts toward the verdict")
        return self


class Artifact(_Model):
    name: str
    kind: str  # e.g. model | transform | defended_model | surrogate | log
    size: Count
    sha256: Sha256


class ImageRef(_Model):
    """A PNG beside report.json, embedded by the HTML and PDF renderers."""

    file: PngName
    caption: str = ""
    attack: str | None = None  # for image grids: the attack whose triggered images are shown


class ErrorInfo(_Model):
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # an auditor.errors.ErrorCode value
    message: str


_REQUIRED_WHEN_SUCCEEDED = (
    "verdict", "timings", "refine", "utility", "probes", "plan", "gates", "defended_model", "figures",
)


class Report(_Model):
    # 2.0 to 2.5 reports still validate
    schema_version: Literal["2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6"] = SCHEMA_VERSION
    audit_id: Annotated[str, Field(min_length=1, max_length=100)]
    created_at: AwareDatetime  # with a time zone, so "when" is unambiguous across machines
    status: Status
    verdict: Verdict | None = None
    spec: dict[str, Any]
    plan: AuditPlan | None = None  # every number the audit ran with (absent only when it failed before planning)
    seed: Count
    software: Software
    inputs: Inputs
    gates: list[Gate] | None = None  # every evidence and defense check, tripped or not
    defended_model: Fitness | None = None  # whether the defended model may replace the submitted one, and why
    figures: dict[str, Figure] | None = None  # headline numbers with n and 95% interval (docs/report-schema.md)
    timings: Timings | None = None
    queries: Queries | None = None
    surrogate: Surrogate | None = None
    refine: Refine | None = None
    utility: Utility | None = None
    probes: Probes | None = None
    detection: Detection | None = None  # trigger reverse-engineering (2.1; absent when it did not run)
    positive_controls: list[PositiveControl] = Field(default_factory=list)
    artifacts: list[Artifact] = Field(default_factory=list)
    images: list[ImageRef] = Field(default_factory=list)
    plots: list[ImageRef] = Field(default_factory=list)
    error: ErrorInfo | None = None
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete_for_status(self) -> Report:
        if self.status == "succeeded":
            missing = [name for name in _REQUIRED_WHEN_SUCCEEDED if getattr(self, name) is None]
            if self.inputs.data is None:
                missing.append("inputs.data")
            if missing:
                raise ValueError(f"a succeeded report needs {', '.join(missing)}")
        if self.status == "failed" and self.error is None:
            raise ValueError("a failed report needs error")
        return self

    @model_validator(mode="after")
    def _inconclusive_when_a_gate_tripped(self) -> Report:
        if self.verdict is None or self.gates is None:
            return self
        tripped = [g.name for g in self.gates if g.tripped]
        if bool(tripped) != (self.verdict.level == "inconclusive"):
            raise ValueError(f"verdict.level is {self.verdict.level} but the tripped gates are {tripped or 'none'}")
        return self

    @model_validator(mode="after")
    def _recovered_trigger_is_evidence(self) -> Report:
        d, v = self.detection, self.verdict
        if d is None or v is None:
            return self
        if v.trigger_evidence is not None and v.trigger_evidence != d.counts_toward_verdict:
            raise ValueError("verdict.trigger_evidence disagrees with detection.counts_toward_verdict")
        if d.counts_toward_verdict and v.level == "no_evidence":
            raise ValueError("a trigger recovered on the submitted model never coexists with no_evidence")
        return self

    @model_validator(mode="after")
    def _sized_by_classes(self) -> Report:
        if self.inputs.data is None:
            return self
        k = self.inputs.data.num_classes
        problems = [f"{path} has {n} entries, expected {k}" for path, n in self._class_sized_lengths() if n != k]
        problems += [f"{path} = {c} is not a class index (< {k})" for path, c in self._class_indices() if c >= k]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _class_sized_lengths(self) -> list[tuple[str, int]]:
        sized: list[tuple[str, int]] = []
        if self.refine is not None:
            sized.append(("refine.mapping", len(self.refine.mapping)))
        if self.utility is not None:
            u = self.utility
            for name in ("per_class_accuracy_before", "per_class_accuracy_after", "predictions_before",
                         "predictions_after"):
                if getattr(u, name) is not None:
                    sized.append((f"utility.{name}", len(getattr(u, name))))
            if u.confusion_after is not None:
                sized.append(("utility.confusion_after", len(u.confusion_after)))
                sized += [(f"utility.confusion_after[{i}]", len(row)) for i, row in enumerate(u.confusion_after)]
        if self.detection is not None:
            sized += [("detection.mask_norms", len(self.detection.mask_norms)),
                      ("detection.anomaly_indices", len(self.detection.anomaly_indices))]
            if self.detection.reached:
                sized.append(("detection.reached", len(self.detection.reached)))
            lo = self.detection.label_only
            if lo is not None:
                sized += [(f"detection.label_only.{name}", len(getattr(lo, name)))
                          for name in ("peaks", "anomaly_indices", "peak_pixels", "images")]
        return sized

    def _class_indices(self) -> list[tuple[str, int]]:
        indices = [(f"positive_controls[{i}].target", pc.target) for i, pc in enumerate(self.positive_controls)]
        if self.detection is not None:
            indices.append(("detection.suspected_class", self.detection.suspected_class))
            if self.detection.label_only is not None:
                indices.append(("detection.label_only.suspected_class", self.detection.label_only.suspected_class))
        if self.probes is not None:
            for side in ("before", "after"):
                result: ProbeResult = getattr(self.probes, side)
                if result.suspected_target is not None:
                    indices.append((f"probes.{side}.suspected_target", result.suspected_target))
                indices += [
                    (f"probes.{side}.evidence[{i}].top_class", ev.top_class)
                    for i, ev in enumerate(result.evidence)
                    if ev.top_class is not None
                ]
        return indices

    @property
    def is_api_audit(self) -> bool:
        return self.inputs.model.source == "api"

    def class_name(self, index: int | None) -> str:
        """``"3 Dress"`` when names are known, so tables are readable without a legend."""
        if index is None:
            return "-"
        if self.inputs.data is None:
            return str(index)
        return f"{index} {self.inputs.data.class_names[index]}"


def validate_report(d: dict[str, Any]) -> Report:
    """Parse a report dict (e.g. loaded from report.json); raise ReportValidationError listing every problem."""
    try:
        return Report.model_validate(d)
    except ValidationError as error:
        raise ReportValidationError(error) from None


def report_json_schema() -> dict[str, Any]:
    """The structural JSON Schema (draft 2020-12) of report.json, for consumers outside Python."""
    schema = Report.model_json_schema(mode="validation")
    succeeded_needs = {name: {"not": {"type": "null"}} for name in _REQUIRED_WHEN_SUCCEEDED}
    schema.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://refine-audit/report/{SCHEMA_VERSION}/report.schema.json",
            "title": "refine-audit report",
            "description": "One audit of an image classifier with the REFINE backdoor defense. "
            "Fractions are in [0, 1]. See docs/report-schema.md.",
            "allOf": [
                {
                    "if": {"properties": {"status": {"const": "succeeded"}}, "required": ["status"]},
                    "then": {"required": list(_REQUIRED_WHEN_SUCCEEDED), "properties": succeeded_needs},
                },
                {
                    "if": {"properties": {"status": {"const": "failed"}}, "required": ["status"]},
                    "then": {"required": ["error"], "properties": {"error": {"not": {"type": "null"}}}},
                },
            ],
        }
    )
    return schema


def write_json_schema(path: Path = DOCS_SCHEMA_PATH) -> Path:
    """Write the JSON Schema where docs and non-Python consumers find it."""
    path.write_text(json.dumps(report_json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
