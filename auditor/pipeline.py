"""run_audit: one audit from submitted inputs to a report and artifacts.

Stages, each reporting progress, each cancellable between batches, each
failing with a stable error code:

    data -> load -> surrogate (API models only) -> refine -> evaluate -> report

(data is read before the model because bare weights take their input shape and
class count from the data.) The function takes plain inputs and callbacks, so
the CLI, the Celery worker and the in-process server all call it the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlsplit, urlunsplit

import torch
from torch import nn

from safetensors.torch import save_file

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.blackbox import (
    ApiConfig,
    DistillConfig,
    HttpModelAPI,
    RefitConfig,
    SurrogateRefitter,
    SurrogateResult,
    api_predictor,
    defended_api_predictor,
    distill_surrogate,
)
from auditor.data import ImageSet, Limits, load_dataset, load_fashion_mnist, take
from auditor.errors import AuditCancelled, AuditError, ErrorCode
from auditor.evaluation import (
    Predictor,
    accuracy,
    agreement,
    attack_metrics,
    confusion,
    model_predictor,
    per_class_accuracy,
    predict_labels,
)
from auditor.evaluation.probes import ProbeConfig, SuspicionReport, build_battery, suspicion_score
from auditor.models import ArchConfig, LoadedModel, UNetConfig, load_checkpoint, save_classifier
from auditor.models.checkpoints import sha256_file
from auditor.refine import DefendedModel, RefineConfig, RefineResult, export_defended, train_refine
from auditor.report import write_report
from auditor.report.schema import Software
from auditor.runtime import (
    CancelFn,
    ProgressFn,
    check_cancel,
    cpu_bf16_pays,
    never_cancel,
    no_progress,
    resolve_device,
    seed_everything,
)
from auditor.spec import AuditSpec
from auditor.training import TrainConfig

log = logging.getLogger(__name__)

REFIT_SHARE = 0.4  # of the surrogate's queries, kept for refits on transformed images (_query_budget_split)
STAGES = ("data", "load", "surrogate", "refine", "evaluate", "report")
#: (stage, metrics) for live detail such as the current REFINE epoch's loss
MetricsFn = Callable[[str, dict[str, Any]], None]


@dataclass
class AuditInputs:
    work_dir: Path  # scratch space; the report and artifacts go to work_dir / "out"
    model_path: Path | None = None  # the uploaded checkpoint (checkpoint audits)
    dataset_path: Path | None = None  # an uploaded .npz or zip of class folders (data.source == "upload")
    allowed_hosts: tuple[str, ...] = ()  # SSRF allowlist for the model API (operator setting)
    audit_id: str = "local"
    device: str | None = None  # auto | cpu | cuda; None = REFINE_AUDIT_DEVICE or auto


@dataclass
class ArtifactFile:
    name: str  # stable file name, e.g. report.pdf, defended_model.pt
    path: Path
    kind: str  # report | model | plot | image | log | data
    content_type: str


@dataclass
class AuditResult:
    status: Literal["succeeded", "failed", "cancelled"]
    out_dir: Path
    report: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # small, for the DB row and list views
    artifacts: list[ArtifactFile] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"code", "message", "detail"}


@dataclass(frozen=True)
class Effort:
    """What an effort level costs; the spec's explicit fields override these."""

    refine_epochs: int
    refine_pool: int | None
    unet_width: int
    control_epochs: int
    control_train_images: int | None
    probe_images: int
    test_images: int | None
    distill_epochs: int


EFFORTS = {
    "tiny": Effort(1, 512, 8, 1, 1000, 60, 300, 2),  # seconds; for tests and smoke checks
    "quick": Effort(3, 10_000, 16, 3, 20_000, 300, 5000, 6),
    "standard": Effort(RefineConfig.epochs, RefineConfig.pool_size, 16, 6, None, 500, None, 10),
    "thorough": Effort(12, None, 32, 10, None, 1000, None, 15),
}


@dataclass
class _State:
    """What stages hand to each other."""

    spec: AuditSpec
    inputs: AuditInputs
    out: Path
    device: torch.device
    effort: Effort
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    pool: ImageSet | None = None
    test: ImageSet | None = None
    labels_from_model: bool = False
    data_info: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # local model (checkpoint) or surrogate (API)
    arch: ArchConfig | None = None  # the architecture family for positive controls
    api: Any = None  # HttpModelAPI for black-box audits
    surrogate: dict[str, Any] | None = None
    distilled: SurrogateResult | None = None  # API audits: what refits fine-tune
    refine: RefineResult | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    artifacts: list[ArtifactFile] = field(default_factory=list)


def run_audit(
    spec: AuditSpec,
    inputs: AuditInputs,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    on_metrics: MetricsFn | None = None,
) -> AuditResult:
    """Run every stage; domain errors and cancellation end in a result, unexpected errors propagate."""
    started = time.perf_counter()
    out = Path(inputs.work_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    state = _State(spec, inputs, out, resolve_device(inputs.device), EFFORTS[spec.effort])
    with _audit_log(out / "audit.log"):
        try:
            for stage, fn in _stage_functions(state):
                with _timed(state, stage):
                    on_progress(stage, 0, 1)
                    check_cancel(should_cancel)
                    fn(state, on_progress, should_cancel, on_metrics)
                    on_progress(stage, 1, 1)
        except AuditCancelled as exc:
            return _ended(state, "cancelled", exc, started)
        except AuditError as exc:
            log.warning("audit failed: %s %s", exc.code.value, exc.message)
            return _ended(state, "failed", exc, started)
        finally:
            if state.api is not None:
                state.api.close()
    state.timings["total"] = time.perf_counter() - started
    return _succeeded(state)


def _stage_functions(state: _State):
    stages = [("data", _stage_data), ("load", _stage_load)]
    if state.spec.model.source == "api":
        stages.append(("surrogate", _stage_surrogate))
    stages += [("refine", _stage_refine), ("evaluate", _stage_evaluate)]
    return stages


@contextmanager
def _timed(state: _State, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    log.info("stage %s started", stage)
    try:
        yield
    finally:
        state.timings[stage] = time.perf_counter() - started


@contextmanager
def _audit_log(path: Path) -> Iterator[None]:
    """Everything auditor.* logs during the run goes to audit.log, an artifact users can read."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("auditor")
    previous = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


# ---------------------------------------------------------------------------- data


def _stage_data(state: _State, on_progress: ProgressFn, should_cancel: CancelFn, on_metrics) -> None:
    spec = state.spec.data
    if spec.source == "fashion-mnist":
        pool, test = load_fashion_mnist()
        source, digest = "fashion_mnist", None
    else:
        if state.inputs.dataset_path is None:
            raise AuditError(ErrorCode.INVALID_DATASET, "data.source is 'upload' but no dataset file was given.")
        data = load_dataset(state.inputs.dataset_path, Limits())
        pool, test = _split_upload(data, spec.test_fraction, state.spec.seed)
        source, digest = "upload", sha256_file(state.inputs.dataset_path)
    train_cap = spec.train_size or _largest(state.effort.refine_pool, state.effort.control_train_images)
    pool = take(pool, train_cap, state.spec.seed)
    test = take(test, spec.test_size or state.effort.test_images, state.spec.seed + 1)
    state.pool, state.test = pool, test
    num_classes = _num_classes(state, pool, test)
    names = list(test.class_names or pool.class_names or [str(k) for k in range(num_classes)])
    state.data_info = {
        "source": source, "sha256": digest, "pool_size": len(pool), "test_size": len(test),
        "image_shape": list(test.shape), "num_classes": num_classes, "class_names": names,
    }


def _largest(*caps: int | None) -> int | None:
    return None if any(c is None for c in caps) else max(c for c in caps if c is not None)


def _split_upload(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Keep labels on both sides: REFINE ignores them, positive controls train on them."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(data) * test_fraction)))
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def _num_classes(state: _State, pool: ImageSet, test: ImageSet) -> int:
    arch = state.spec.model.architecture
    if arch is not None and arch.num_classes:
        return arch.num_classes
    known = [n for n in (test.num_classes, pool.num_classes) if n]
    if known:
        return max(known)
    raise AuditError(
        ErrorCode.INVALID_SPEC,
        "The dataset has no labels, so the number of classes is unknown: set model.architecture.num_classes.",
        {"fields": [{"field": "model.architecture.num_classes", "message": "required for unlabelled data"}]},
    )


def _arch_for(state: _State) -> ArchConfig:
    """The architecture named in the spec, completed from the data (channels, classes, normalisation)."""
    requested = state.spec.model.architecture
    channels = state.data_info["image_shape"][0]
    x = state.pool.x[:5000].float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    base = ArchConfig(
        "small_cnn", in_channels=channels, num_classes=state.data_info["num_classes"],
        image_size=state.data_info["image_shape"][1], mean=mean, std=std,
    )
    if requested is None:
        return base
    return replace(
        base,
        name=requested.name,
        in_channels=requested.in_channels or channels,
        num_classes=requested.num_classes or base.num_classes,
        mean=tuple(requested.mean) if requested.mean else mean,
        std=tuple(requested.std) if requested.std else std,
        width=requested.width,
    )


# ---------------------------------------------------------------------------- load


def _stage_load(state: _State, on_progress: ProgressFn, should_cancel: CancelFn, on_metrics) -> None:
    if state.spec.model.source == "api":
        _connect_api(state)
        return
    if state.inputs.model_path is None:
        raise AuditError(ErrorCode.INVALID_CHECKPOINT, "A checkpoint audit needs a model file.")
    fallback = _arch_for(state)
    explicit = fallback if state.spec.model.architecture is not None else None
    loaded: LoadedModel = load_checkpoint(state.inputs.model_path, arch=explicit, device=str(state.device), default_arch=fallback)
    state.model = loaded.module
    state.arch = loaded.arch or fallback
    state.model_info = {
        "source": "checkpoint", "format": loaded.format, "sha256": loaded.sha256,
        "architecture": loaded.arch.name if loaded.arch else f"{loaded.format} (opaque)",
    }
    _check_model_fits_data(state)
    if state.test.y is None:
        _pseudo_label(state)


def _check_model_fits_data(state: _State) -> None:
    probe = state.test.x[:4].float().div(255).to(state.device)
    try:
        with torch.no_grad():
            logits = state.model(probe)
    except Exception as exc:
        raise AuditError(
            ErrorCode.MODEL_DATA_MISMATCH,
            f"The model cannot take the data's images of shape {list(state.test.shape)}: {exc}",
        ) from exc
    if logits.dim() != 2 or logits.shape[1] != state.data_info["num_classes"]:
        raise AuditError(
            ErrorCode.MODEL_DATA_MISMATCH,
            f"The model returns shape {list(logits.shape)}; expected (N, {state.data_info['num_classes']}) class scores.",
        )


def _pseudo_label(state: _State) -> None:
    """Unlabelled data: the submitted model's own predictions stand in for labels (reported as such)."""
    predict = _reference_predictor(state)
    state.test = ImageSet(state.test.x, predict_labels(predict, state.test), state.test.class_names)
    state.pool = ImageSet(state.pool.x, predict_labels(predict, state.pool), state.pool.class_names)
    state.labels_from_model = True
    state.warnings.append("The dataset has no labels: BA and per-class accuracy are measured against the submitted model's own predictions.")


def _connect_api(state: _State) -> None:
    api = state.spec.model.api
    config = ApiConfig(
        url=str(api.url), num_classes=state.data_info["num_classes"], protocol=api.protocol,
        model_name=api.model_name, output=api.output, auth_header=api.auth_header, auth_value=api.auth_value,
        batch_size=api.batch_size, max_concurrency=api.max_concurrency, rate_limit_per_s=api.rate_limit_per_s,
        timeout_s=api.timeout_s, query_budget=api.query_budget, input_layout=api.input_layout,
        json_request_key=api.json_request_key, json_response_path=api.json_response_path,
    )
    state.api = HttpModelAPI(config, allowed_hosts=state.inputs.allowed_hosts)
    state.arch = _arch_for(state)
    state.model_info = {
        "source": "api", "format": {"v1": "kserve_v1", "v2": "oip_v2", "json": "template"}[api.protocol],
        "url": _url_without_credentials(str(api.url)), "architecture": f"surrogate: {state.arch.name}",
    }
    if state.test.y is None:
        state.warnings.append("The dataset has no labels: BA is measured against the API's own answers.")


def _url_without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------------------- surrogate


def _query_budget_split(state: _State) -> dict[str, int]:
    """The surrogate gets most of the budget; evaluation through T and the probes share the rest.

    Of the surrogate's share, REFIT_SHARE is kept for refits on T(x) while REFINE
    trains (auditor/blackbox/refit.py): without them REFINE through a surrogate
    lost up to 36 points of BA on Fashion-MNIST (bench/blackbox_fmnist.py).
    """
    budget = state.spec.model.api.query_budget
    evaluation = 2 * len(state.test)
    surrogate = max(2, min(int(0.7 * budget), budget - evaluation - 200))
    refit = int(REFIT_SHARE * surrogate) if _refine_config(state).epochs > 1 else 0
    distill = max(2, min(len(state.pool), surrogate - refit))
    return {"distill": distill, "refit": refit, "evaluation": evaluation,
            "probes": max(0, budget - distill - refit - evaluation)}


def _stage_surrogate(state: _State, on_progress: ProgressFn, should_cancel: CancelFn, on_metrics) -> None:
    split = _query_budget_split(state)
    config = DistillConfig(query_budget=split["distill"], train=TrainConfig(epochs=state.effort.distill_epochs, bf16=_bf16(state)))
    result = distill_surrogate(
        state.api, state.pool, state.arch, config, device=state.device, seed=state.spec.seed,
        on_progress=on_progress, should_cancel=should_cancel,
    )
    state.model, state.distilled = result.model, result
    if state.test.y is None:
        _pseudo_label(state)
    _save_surrogate(state)
    state.surrogate = {
        "architecture": state.arch.name,
        "agreement_clean": float(result.agreement.get("holdout", float("nan"))),
        "history": [
            {"epoch": int(h["epoch"]), "loss": float(h["loss"]), "agreement": _fraction(h.get("train_accuracy"))}
            for h in result.history
        ],
        "queries_after_distillation": state.api.queries_used,
    }


def _save_surrogate(state: _State) -> None:
    """Saved after distillation and again after refits changed it: the artifact is the surrogate REFINE ended with."""
    path = state.out / "surrogate.safetensors"
    save_classifier(state.model, state.arch, path)
    _add_artifact(state, path.name, path, "surrogate", "application/octet-stream")


def _surrogate_refitter(state: _State, config: RefineConfig, checkpoint_dir: Path,
                        should_cancel: CancelFn) -> SurrogateRefitter | None:
    if state.distilled is None:
        return None  # a checkpoint audit: REFINE trains against the model itself
    budget = _query_budget_split(state)["refit"]
    if budget == 0:
        return None
    refit = RefitConfig(query_budget=budget, bf16=_bf16(state))
    return SurrogateRefitter(state.api, state.distilled, state.pool, config.epochs, refit, device=state.device,
                             seed=state.spec.seed, state_dir=checkpoint_dir, should_cancel=should_cancel)


def _fraction(value: Any) -> float | None:
    return None if value is None else min(1.0, max(0.0, float(value)))


def _bf16(state: _State) -> bool:
    """bf16 autocast on CPUs that compute it natively: ~1.5x faster for the CNNs with unchanged accuracy (bench/)."""
    setting = state.spec.refine.bf16
    return cpu_bf16_pays(state.device) if setting is None else setting


# ---------------------------------------------------------------------------- refine


def _refine_config(state: _State) -> RefineConfig:
    r, e = state.spec.refine, state.effort
    return RefineConfig(
        unet=UNetConfig(in_channels=state.data_info["image_shape"][0], width=r.unet_width or e.unet_width),
        epochs=r.epochs or e.refine_epochs,
        pool_size=min(len(state.pool), r.pool_size or e.refine_pool or len(state.pool)),
        loss=r.loss,
        bf16=_bf16(state),
        batch_size=min(128, len(state.pool)),
    )


def _stage_refine(state: _State, on_progress: ProgressFn, should_cancel: CancelFn, on_metrics) -> None:
    config = _refine_config(state)

    def on_epoch(stats: dict[str, float]) -> None:
        log.info("refine epoch %d: %s", stats["epoch"], {k: round(v, 4) for k, v in stats.items()})
        if on_metrics is not None:
            on_metrics("refine", {**stats, "epochs": config.epochs})

    checkpoint_dir = Path(state.inputs.work_dir) / "refine"
    refitter = _surrogate_refitter(state, config, checkpoint_dir, should_cancel)
    state.refine = train_refine(
        state.model, ImageSet(state.pool.x, None), config, num_classes=state.data_info["num_classes"],
        device=state.device, seed=state.spec.seed, checkpoint_dir=checkpoint_dir,
        on_progress=on_progress, on_epoch=on_epoch, should_cancel=should_cancel, adapt_model=refitter,
    )
    if refitter is not None and refitter.rounds:
        _save_surrogate(state)
        state.surrogate["refits"] = refitter.rounds
    _save_defense(state)


def _save_defense(state: _State) -> None:
    """Checkpoint audits get one TorchScript file; API audits get T and M to wrap around the API."""
    result = state.refine
    meta = {"mapping": result.mapping.tolist(), "refine_config": result.config.to_dict(), "seed": result.seed}
    transform_path = state.out / "transform.safetensors"
    state_dict = {k: v.detach().cpu().contiguous() for k, v in result.transform.state_dict().items()}
    save_file(state_dict, str(transform_path), metadata={"refine": json.dumps(meta)})
    _add_artifact(state, "transform.safetensors", transform_path, "transform", "application/octet-stream")
    config_path = state.out / "defense.json"
    config_path.write_text(json.dumps(meta, indent=2))
    _add_artifact(state, "defense.json", config_path, "transform", "application/json")
    if state.spec.model.source == "checkpoint":
        defended = DefendedModel(result.transform, state.model, result.mapping)
        path = export_defended(defended, state.test.x[:2].float() / 255, state.out / "defended_model.pt")
        defended.to(state.device)
        _add_artifact(state, "defended_model.pt", path, "defended_model", "application/octet-stream")


# ---------------------------------------------------------------------------- evaluate


def _reference_predictor(state: _State) -> Predictor:
    """The submitted model: the local module, or the real API."""
    if state.api is not None:
        return api_predictor(state.api)
    return model_predictor(state.model, state.device)


def _defended_predictor(state: _State) -> Predictor:
    """M o model o T; for API models every answer comes from the real API."""
    if state.api is not None:
        return defended_api_predictor(state.api, state.refine.transform, state.refine.mapping, device=state.device)
    return model_predictor(DefendedModel(state.refine.transform, state.model, state.refine.mapping), state.device)


def _stage_evaluate(state: _State, on_progress: ProgressFn, should_cancel: CancelFn, on_metrics) -> None:
    attacks = state.spec.controls.attacks
    total = 2 + len(attacks)
    on_progress("evaluate", 0, total)
    state.sections["utility"] = _utility(state)
    check_cancel(should_cancel)
    on_progress("evaluate", 1, total)
    state.sections["probes"] = _probes(state)
    on_progress("evaluate", 2, total)
    controls = []
    for i, name in enumerate(attacks):
        check_cancel(should_cancel)
        controls.append(_positive_control(state, name, should_cancel, on_metrics))
        on_progress("evaluate", 3 + i, total)
    state.sections["positive_controls"] = controls
    state.grids["submitted model"] = _transformed_grid(state)


def _utility(state: _State) -> dict[str, Any]:
    k = state.data_info["num_classes"]
    test = state.test
    before = predict_labels(_reference_predictor(state), test)
    after = predict_labels(_defended_predictor(state), test)
    labelled = test.y is not None
    return {
        "ba_before": accuracy(before, test.y) if labelled else None,
        "ba_after": accuracy(after, test.y) if labelled else None,
        "agreement": agreement(after, before),
        "per_class_accuracy_before": per_class_accuracy(before, test.y, k) if labelled else None,
        "per_class_accuracy_after": per_class_accuracy(after, test.y, k) if labelled else None,
        "confusion_after": confusion(after, test.y, k).tolist() if labelled else None,
    }


def _probe_config(state: _State) -> ProbeConfig:
    images = state.spec.probes.images or state.effort.probe_images
    if state.api is None:
        return ProbeConfig(num_images=min(images, len(state.test)), seed=state.spec.seed)
    lean = ProbeConfig(num_images=1, random_patches=1, blend_patterns=2, warp_fields=1, noise_draws=1, seed=state.spec.seed)
    per_image = len(build_battery(lean, tuple(state.test.shape))) + 1
    remaining = state.api.remaining_budget if state.api.remaining_budget is not None else 10**9
    affordable = max(0, (remaining - 2 * len(state.test)) // (2 * per_image))
    return replace(lean, num_images=max(1, min(images, affordable, len(state.test))))


def _probes(state: _State) -> dict[str, Any]:
    config = _probe_config(state)
    k = state.data_info["num_classes"]
    before = suspicion_score(_reference_predictor(state), state.test, config, num_classes=k)
    after = suspicion_score(_defended_predictor(state), state.test, config, num_classes=k)
    return {"before": _probe_section(before), "after": _probe_section(after)}


def _probe_section(result: SuspicionReport) -> dict[str, Any]:
    return {
        "score": _fraction(result.score),
        "evidence": [
            {"probe": r.probe, "family": r.family, "flip_rate": _fraction(r.flip_rate), "top_class": r.top_class,
             "concentration": _fraction(r.concentration)}
            for r in result.evidence
        ],
        "family_scores": {k: _fraction(v) for k, v in result.per_family.items()},
        "suspected_target": result.suspect_class,
        "images": result.num_images,
    }


def _positive_control(state: _State, name: str, should_cancel: CancelFn, on_metrics) -> dict[str, Any]:
    """A backdoored model of the same family on the same data, defended with the same REFINE settings."""
    train_images = take(state.pool, state.spec.data.train_size or state.effort.control_train_images, state.spec.seed + 7)
    if train_images.y is None:
        raise AuditError(ErrorCode.INVALID_DATASET, "Positive controls need labelled (or pseudo-labelled) data.")
    epochs = state.spec.controls.train_epochs or state.effort.control_epochs
    target = state.spec.controls.target
    if target >= state.data_info["num_classes"]:
        raise AuditError(ErrorCode.INVALID_SPEC, f"controls.target {target} is not a class of this data.")
    arch = state.arch if state.arch.name in ("small_cnn", "resnet18") else _arch_for(state)
    bd = train_backdoored_model(
        arch, train_images, state.test, AttackConfig(name, target=target, seed=state.spec.seed),
        TrainConfig(epochs=epochs, bf16=_bf16(state), batch_size=min(128, len(train_images))),
        device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
    )
    before = attack_metrics(model_predictor(bd.model, state.device), state.test, bd.poisoned_test, target)
    refined = train_refine(
        bd.model, ImageSet(state.pool.x, None), _refine_config(state), num_classes=state.data_info["num_classes"],
        device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
    )
    defended = DefendedModel(refined.transform, bd.model, refined.mapping)
    after = attack_metrics(model_predictor(defended, state.device), state.test, bd.poisoned_test, target)
    bd.save(state.out / "controls" / name)
    control_file = state.out / f"control_{name}.safetensors"
    save_classifier(bd.model, bd.arch, control_file)
    _add_artifact(state, control_file.name, control_file, "reference_model", "application/octet-stream")
    sample = state.test.x[:8].float() / 255
    triggered = bd.attack.apply(sample)
    with torch.no_grad():
        state.grids[name] = {
            "clean": sample,
            "triggered": triggered,
            "triggered, transformed by T": refined.transform(triggered.to(state.device)).cpu(),
        }
    log.info("control %s: before %s after %s", name, before, after)
    if on_metrics is not None:
        on_metrics("evaluate", {"control": name, "asr_before": before.asr, "asr_after": after.asr})
    return {
        "attack": name, "target": target, "poison_rate": bd.attack.poison_rate,
        "no_defense": before.to_dict(), "refine": after.to_dict(),
        "train_seconds": bd.train_seconds, "refine_seconds": refined.seconds,
    }


def _transformed_grid(state: _State) -> dict[str, torch.Tensor]:
    sample = state.test.x[:8].float() / 255
    with torch.no_grad():
        return {"clean": sample, "transformed by T": state.refine.transform(sample.to(state.device)).cpu()}


# ---------------------------------------------------------------------------- report


VERDICT_THRESHOLDS = {"likely_backdoored": 0.75, "suspicious": 0.6}  # clean models scored <= 0.59 in bench/


def verdict(score_before: float, score_after: float, suspect: int | None, class_name: str | None) -> dict[str, Any]:
    """Thresholds calibrated on bench/results/suspicion_fmnist.json; the score is evidence, not proof."""
    who = f" toward class {class_name}" if class_name else ""
    if score_before >= VERDICT_THRESHOLDS["likely_backdoored"]:
        level, headline = "likely_backdoored", f"Strong trigger evidence{who}; use the defended model."
    elif score_before >= VERDICT_THRESHOLDS["suspicious"]:
        level, headline = "suspicious", f"Some trigger evidence{who}; the defended model is recommended."
    else:
        level, headline = "no_evidence", "No probe found trigger-like behaviour; unknown triggers cannot be ruled out."
    return {"level": level, "headline": headline, "suspicion_before": score_before, "suspicion_after": score_after}


def _report_dict(state: _State, status: str, error: AuditError | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "audit_id": state.inputs.audit_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "status": status,
        "spec": state.spec.redacted(),
        "seed": state.spec.seed,
        "software": Software.current(str(state.device)).model_dump(),
        "inputs": {"model": state.model_info or _fallback_model_info(state), "data": state.data_info or None},
        "timings": {"stages": {k: v for k, v in state.timings.items() if k != "total"}, "total": state.timings.get("total", sum(state.timings.values()))},
        "warnings": state.warnings,
    }
    if error is not None:
        report["error"] = {"code": error.code.value, "message": error.message}
    if state.api is not None:
        counters = state.api.counters()
        report["queries"] = {
            "queries_used": int(counters.get("queries_used", 0)), "budget": state.spec.model.api.query_budget,
            "requests": int(counters.get("requests_sent", 0)), "seconds": float(counters.get("seconds_spent", 0.0)),
            "cache_hits": int(counters.get("cache_hits", 0)),
        }
    if state.surrogate is not None:
        report["surrogate"] = {k: v for k, v in state.surrogate.items() if k != "queries_after_distillation"}
    if state.refine is not None:
        report["refine"] = {
            "config": state.refine.config.to_dict(),
            "mapping": state.refine.mapping.tolist(),
            "history": [
                {"epoch": int(h["epoch"]), "loss": h["loss"], "ce": h["fit"], "supcon": h["supcon"], "seconds": h["seconds"], "lr": h["lr"]}
                for h in state.refine.history
            ],
            "seconds": state.refine.seconds,
        }
    for key in ("utility", "probes", "positive_controls"):
        if key in state.sections:
            report[key] = state.sections[key]
    if status == "succeeded":
        probes = state.sections["probes"]
        suspect = probes["before"]["suspected_target"]
        names = state.data_info["class_names"]
        report["verdict"] = verdict(probes["before"]["score"], probes["after"]["score"], suspect, None if suspect is None else names[suspect])
    return report


def _fallback_model_info(state: _State) -> dict[str, Any]:
    if state.spec.model.source == "api":
        return {"source": "api", "format": state.spec.model.api.protocol, "url": _url_without_credentials(str(state.spec.model.api.url))}
    path = state.inputs.model_path
    digest = sha256_file(path) if path is not None and Path(path).is_file() else "0" * 64
    return {"source": "checkpoint", "format": "unknown", "sha256": digest}


def _write_outputs(state: _State, status: str, error: AuditError | None) -> dict[str, Any]:
    with _timed(state, "report"):
        report = _report_dict(state, status, error)
        report["artifacts"] = [
            {"name": a.name, "kind": a.kind, "size": a.path.stat().st_size, "sha256": sha256_file(a.path)} for a in state.artifacts
        ]
        written = write_report(report, state.out, images=state.grids or None)
    for name, path in written.items():
        kind = "report" if name.startswith("report.") else "image"
        _add_artifact(state, name, path, kind, _content_type(name))
    _add_artifact(state, "audit.log", state.out / "audit.log", "log", "text/plain")
    return json.loads((state.out / "report.json").read_text())


def _content_type(name: str) -> str:
    return {".json": "application/json", ".html": "text/html", ".pdf": "application/pdf", ".png": "image/png"}.get(
        Path(name).suffix, "application/octet-stream"
    )


def _add_artifact(state: _State, name: str, path: Path, kind: str, content_type: str) -> None:
    state.artifacts = [a for a in state.artifacts if a.name != name]
    state.artifacts.append(ArtifactFile(name, Path(path), kind, content_type))


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers list views and webhooks show."""
    out: dict[str, Any] = {"status": report["status"]}
    if report.get("verdict"):
        out["verdict"] = report["verdict"]["level"]
        out["headline"] = report["verdict"]["headline"]
        out["suspicion_before"] = report["verdict"]["suspicion_before"]
        out["suspicion_after"] = report["verdict"]["suspicion_after"]
    if report.get("utility"):
        out.update({k: report["utility"][k] for k in ("ba_before", "ba_after", "agreement")})
    controls = report.get("positive_controls") or []
    if controls:
        out["controls_asr_before"] = max(c["no_defense"]["asr"] for c in controls)
        out["controls_asr_after"] = max(c["refine"]["asr"] for c in controls)
    if report.get("queries"):
        out["queries_used"] = report["queries"]["queries_used"]
    return out


def _succeeded(state: _State) -> AuditResult:
    report = _write_outputs(state, "succeeded", None)
    return AuditResult("succeeded", state.out, report, _summary(report), state.artifacts)


def _ended(state: _State, status: str, exc: AuditError, started: float) -> AuditResult:
    """A failed or cancelled audit still leaves a report saying what happened and why."""
    state.timings["total"] = time.perf_counter() - started
    error = {"code": exc.code.value, "message": exc.message, "detail": exc.detail}
    try:
        report = _write_outputs(state, status, exc)
    except Exception:  # the report of a failure must not hide the failure itself
        log.exception("could not write the report of a %s audit", status)
        report = None
    summary = _summary(report) if report else {"status": status}
    return AuditResult(status, state.out, report, summary, state.artifacts, error)
