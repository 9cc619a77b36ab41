"""Positive controls: backdoors the service plants itself, to show REFINE removes them on this data.

For each attack of the plan, a model of the submitted model's family is trained
on the pool with that backdoor, defended with exactly the REFINE settings the
submitted model got, and scored before and after. A control proves something only
if its backdoor implanted and REFINE removed it; the gates check both.

Controls are our own models, so an audit reuses one an earlier audit trained with
the same inputs (``cache.py``), and its REFINE defense when the REFINE settings
match too; a reused control is scored afresh on this audit's test images, so
nothing in the report is copied from the cache. The report says which controls
were ``reused`` (with the cache key and the audit that trained them) and which
were ``trained``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.attacks.catalog import build_attack
from auditor.attacks.training import BackdooredModel, ImplantRule
from auditor.data import ImageSet
from auditor.errors import AuditError, ErrorCode
from auditor.evaluation import attack_metrics, model_predictor
from auditor.evaluation.intervals import share_interval
from auditor.models import ArchConfig, UNet, build_classifier, save_classifier
from auditor.pipeline import cache as cc
from auditor.pipeline.load import arch_for
from auditor.pipeline.plan import ControlsPlan
from auditor.pipeline.refine import refine_config
from auditor.pipeline.state import AuditState, MetricsFn
from auditor.pipeline.verdict import ControlFinding
from auditor.refine import DefendedModel, RefineConfig, inference_transform, train_refine
from auditor.refine.remap import derangement
from auditor.refine.trainer import RefineResult
from auditor.runtime import CancelFn, check_cancel
from auditor.training import TrainConfig, channels_last_if_accepted

log = logging.getLogger(__name__)

PART_POLL_S = 1.0  # how often a control waits for its part's entries to appear
CONTROL_ARCHITECTURES = ("small_cnn", "resnet18")  # families refine-audit can train; others fall back to small_cnn
MODEL_FILE, TRANSFORM_FILE = "model.safetensors", "transform.safetensors"


@dataclass
class _Slot:
    """Where one control lives in the cache (None: not cacheable) and what happened to it there."""

    cache: cc.ControlCache | None = None
    group: dict[str, Any] = field(default_factory=dict)
    control_key: str | None = None
    refine_key: str | None = None
    control: cc.Entry | None = None  # the entry reused or written
    refine_reused: bool = False

    def report(self) -> dict[str, Any] | None:
        if self.cache is None or self.control_key is None:
            return None
        provenance = self.control.provenance if self.control is not None else {"audit_id": "", "created_at": ""}
        rejected = [f"{key}: {why}" for key, why in self.cache.rejected.items()
                    if key in (self.control_key, self.refine_key)]
        return {"key": self.control_key, "refine_key": self.refine_key,
                "refine_origin": "reused" if self.refine_reused else "trained",
                "created_by": provenance["audit_id"], "created_at": provenance["created_at"], "rejected": rejected}


def run_control(state: AuditState, name: str, should_cancel: CancelFn, on_metrics: MetricsFn | None) -> dict[str, Any]:
    """Reuse or train, defend and score one control; returns its report entry."""
    plan = state.plan.controls
    train_images, holdout = control_split(state.pool, plan, state.spec.seed + 7)
    if train_images.y is None:
        raise AuditError(ErrorCode.INVALID_DATASET, "Positive controls need labelled (or pseudo-labelled) data.")
    arch = state.arch if state.arch.name in CONTROL_ARCHITECTURES else arch_for(state)
    config = refine_config(state.plan)
    slot = _slot(state, name, arch, config)
    _await_part(slot, name, should_cancel)
    bd = _reused_control(state, slot, name, arch)
    reused = bd is not None
    if bd is None:
        bd = train_backdoored_model(
            arch, train_images, state.test, AttackConfig(name, target=plan.target, seed=state.spec.seed),
            TrainConfig(epochs=plan.epochs, bf16=state.plan.bf16, batch_size=plan.batch_size),
            device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
            rule=implant_rule(plan), holdout=holdout,
        )
    channels_last_if_accepted(bd.model, state.test.x[:2].float().div(255).to(state.device))
    before = attack_metrics(model_predictor(bd.model, state.device), state.test, bd.poisoned_test, plan.target)
    control_file = _keep_model(state, name, bd)
    if not reused:
        _store_control(slot, control_file, bd, before.asr)
    refined = _reused_refine(state, slot, config) if reused else None
    if refined is None:
        refined = train_refine(
            bd.model, ImageSet(state.pool.x, None), config, num_classes=state.num_classes,
            device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
        )
        _store_refine(state, slot, name, refined)
    defended = DefendedModel(inference_transform(refined.transform), bd.model, refined.mapping)
    after = attack_metrics(model_predictor(defended, state.device), state.test, bd.poisoned_test, plan.target)
    _keep_grid(state, name, bd, refined.transform)
    log.info("control %s (%s): before %s after %s", name, "reused" if reused else "trained", before, after)
    if on_metrics is not None:
        on_metrics("evaluate", {"control": name, "asr_before": before.asr, "asr_after": after.asr})
    return {
        "attack": name, "target": plan.target, "poison_rate": bd.attack.poison_rate,
        "no_defense": before.to_dict(), "refine": after.to_dict(),
        "train_seconds": bd.train_seconds, "refine_seconds": refined.seconds, "training": _training(bd, plan),
        "test_images": len(state.test), "triggered_images": int((bd.poisoned_test.y != plan.target).sum()),
        "origin": "reused" if reused else "trained", "cache": slot.report(),
    }


def implant_rule(plan: ControlsPlan) -> ImplantRule | None:
    """The plan's stopping rule for control training (None: train every epoch of the cap)."""
    if plan.stop_rule != "implanted":
        return None
    return ImplantRule(check_every=plan.check_every, min_asr=plan.min_asr, ba_tolerance=plan.ba_tolerance,
                       cooldown_share=plan.cooldown_share)


def control_split(pool: ImageSet, plan: ControlsPlan, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Disjoint seeded draws from the pool: the control's training images and the held-out split the rule reads."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    holdout = pool.subset(order[: plan.holdout_images].sort().values) if plan.holdout_images else None
    rest = order[plan.holdout_images:]
    return pool.subset(rest[: plan.train_images].sort().values), holdout


def _training(bd: BackdooredModel, plan: ControlsPlan) -> dict[str, Any]:
    """How long the control trained and what the rule saw when it stopped (the last held-out check)."""
    last = bd.checks[-1] if bd.checks else None
    return {"steps": bd.train_steps, "max_steps": bd.max_steps or plan.max_steps, "stop_rule": plan.stop_rule,
            "stopped_early": bd.train_steps < (bd.max_steps or plan.max_steps),
            "holdout_images": plan.holdout_images,
            "holdout_ba": None if last is None else last["ba"], "holdout_asr": None if last is None else last["asr"]}


# -- the cache ---------------------------------------------------------------------------------------------------


def _slot(state: AuditState, name: str, arch: ArchConfig, config: RefineConfig) -> _Slot:
    """This control's keys, when the audit has a cache folder and the control can be cached."""
    if state.inputs.control_cache is None:
        return _Slot()
    if state.control_cache is None:
        state.control_cache = cc.ControlCache(state.inputs.control_cache, state.inputs.audit_id)
    digest = cc.data_digest(state.spec, state.inputs.dataset_path, state.inputs.fmnist_dir)
    groups = cc.control_groups(state.spec, state.plan, digest, state.labelled)
    if name not in groups:
        return _Slot()
    control_key = cc.control_key(groups[name], arch)
    return _Slot(state.control_cache, cc.group_inputs(state.spec, state.plan, digest, name), control_key,
                 cc.refine_key(control_key, config, state.num_classes, state.spec.seed))


def _await_part(slot: _Slot, name: str, should_cancel: CancelFn) -> None:
    """Wait while another task of this audit trains this control (a split audit, ``worker/parts.py``).

    The pipeline cannot reach the database or the store (it may run in a sandbox), so the
    trusted side talks to it through the cache folder: ``.pending`` says a control task is
    on it; ``.waiting``, written here, says the result is needed now. The trusted side then
    either copies the part's entries in or takes the part back, and removes ``.pending`` in
    both cases -- after which the control is reused from the cache, or trained here.
    """
    if slot.cache is None or not (pending := cc.pending_file(slot.cache.root, name)).exists():
        return
    cc.waiting_file(slot.cache.root, name).touch()
    log.info("control %s: waiting for the task of this audit that trains it", name)
    started = time.monotonic()
    while pending.exists():
        check_cancel(should_cancel)
        time.sleep(PART_POLL_S)
    log.info("control %s: waited %.0f s", name, time.monotonic() - started)


def _reused_control(state: AuditState, slot: _Slot, name: str, arch: ArchConfig) -> BackdooredModel | None:
    """The cached control model, loaded into our own architecture (strictly: every weight, every shape)."""
    if slot.cache is None or (entry := slot.cache.read(slot.control_key)) is None:
        return None
    try:
        model = build_classifier(arch)
        model.load_state_dict(load_file(str(entry.file(MODEL_FILE))), strict=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable or misfitting file is a bad entry
        slot.cache.discard(slot.control_key, f"the weights do not load into {arch.name}: {exc}"[:300])
        return None
    slot.control = entry
    attack = build_attack(AttackConfig(name, target=state.plan.controls.target, seed=state.spec.seed),
                          tuple(state.plan.data.image_shape))
    log.info("control %s: reusing %s (trained by audit %s)", name, entry.key, entry.provenance["audit_id"])
    return BackdooredModel(model=model.to(state.device).eval(), arch=arch, attack=attack,
                           poisoned_test=attack.triggered_test(state.test),
                           poisoned_count=int(entry.manifest.get("poisoned_count", 0)), train_seconds=0.0,
                           train_steps=_cached_count(entry, "train_steps"),
                           max_steps=_cached_count(entry, "max_steps"), checks=_cached_checks(entry))


def _cached_count(entry: cc.Entry, key: str) -> int:
    """A step count from the manifest (which no hash covers): 0, i.e. unknown, unless it is a sane integer."""
    value = entry.manifest.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40 else 0


def _cached_checks(entry: cc.Entry) -> list[dict[str, float]]:
    """The held-out check the cached control ended with, as its manifest recorded it (none if malformed: the
    manifest's numbers are not covered by a hash, and a share outside [0, 1] would fail the report's validation)."""
    last = entry.manifest.get("last_check")
    if not isinstance(last, dict) or not all(isinstance(last.get(k), (int, float)) for k in ("step", "ba", "asr")):
        return []
    if not (0 <= last["ba"] <= 1 and 0 <= last["asr"] <= 1 and last["step"] >= 0):
        return []
    return [{k: float(last[k]) for k in ("step", "ba", "asr")}]


def _reused_refine(state: AuditState, slot: _Slot, config: RefineConfig) -> RefineResult | None:
    """The cached REFINE defense of this very control model (its manifest names the model's sha256)."""
    if slot.cache is None or slot.control is None or (entry := slot.cache.read(slot.refine_key)) is None:
        return None
    mapping = derangement(state.num_classes, state.spec.seed if config.mapping_seed is None else config.mapping_seed)
    try:
        if entry.manifest.get("control_sha256") != slot.control.manifest["files"][MODEL_FILE]["sha256"]:
            raise ValueError("it defends another control model")
        if entry.manifest.get("mapping") != mapping.tolist():
            raise ValueError("its label mapping is not this audit's")
        transform = UNet(config.unet)
        transform.load_state_dict(load_file(str(entry.file(TRANSFORM_FILE))), strict=True)
    except Exception as exc:  # noqa: BLE001 -- as above
        slot.cache.discard(slot.refine_key, f"unusable REFINE entry: {exc}"[:300])
        return None
    slot.refine_reused = True
    return RefineResult(transform.to(state.device).eval(), mapping, config, state.spec.seed, [], 0.0)


def _store_control(slot: _Slot, control_file: Path, bd: BackdooredModel, asr: float) -> None:
    if slot.cache is None:
        return
    info = {"poisoned_count": bd.poisoned_count, "train_seconds": bd.train_seconds, "asr_when_trained": asr,
            "arch": bd.arch.to_dict(), "train_steps": bd.train_steps, "max_steps": bd.max_steps,
            "last_check": bd.checks[-1] if bd.checks else None}
    slot.control = slot.cache.write(slot.control_key, {MODEL_FILE: control_file}, slot.group, info)


def _store_refine(state: AuditState, slot: _Slot, name: str, refined: RefineResult) -> None:
    if slot.cache is None or slot.control is None:
        return
    path = state.out / "controls" / name / TRANSFORM_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in refined.transform.state_dict().items()}, str(path))
    info = {"control_sha256": slot.control.manifest["files"][MODEL_FILE]["sha256"],
            "mapping": refined.mapping.tolist(), "seconds": refined.seconds}
    inputs = {"control": slot.control_key, "refine": refined.config.to_dict(), "num_classes": state.num_classes,
              "seed": state.spec.seed}
    slot.cache.write(slot.refine_key, {TRANSFORM_FILE: path}, inputs, info)


# -- artifacts -----------------------------------------------------------------------------------------------------


def _keep_model(state: AuditState, name: str, bd: BackdooredModel) -> Path:
    bd.save(state.out / "controls" / name)
    control_file = state.out / f"control_{name}.safetensors"
    save_classifier(bd.model, bd.arch, control_file)
    state.add_artifact(control_file.name, control_file, "reference_model", "application/octet-stream")
    return control_file


def _keep_grid(state: AuditState, name: str, bd: Any, transform: torch.nn.Module) -> None:
    sample = state.test.x[:8].float() / 255
    triggered = bd.attack.apply(sample)
    with torch.no_grad():
        state.grids[name] = {
            "clean": sample,
            "triggered": triggered,
            "triggered, transformed by T": transform(triggered.to(state.device)).cpu(),
        }


def control_findings(controls: list[dict[str, Any]]) -> tuple[ControlFinding, ...]:
    """ASR before and after of each control, with the triggered images behind them."""
    return tuple(
        ControlFinding(c["attack"], share_interval(c["no_defense"]["asr"], c["triggered_images"]),
                       share_interval(c["refine"]["asr"], c["triggered_images"]))
        for c in controls
    )
