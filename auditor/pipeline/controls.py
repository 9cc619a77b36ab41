"""Positive controls: backdoors the service plants itself, to show REFINE removes them on this data.

For each attack of the plan, a model of the submitted model's family is trained
on the pool with that backdoor, defended with exactly the REFINE settings the
submitted model got, and scored before and after. A control proves something only
if its backdoor implanted and REFINE removed it; the gates check both.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.data import ImageSet, take
from auditor.errors import AuditError, ErrorCode
from auditor.evaluation import attack_metrics, model_predictor
from auditor.evaluation.intervals import share_interval
from auditor.models import save_classifier
from auditor.pipeline.load import arch_for
from auditor.pipeline.refine import refine_config
from auditor.pipeline.state import AuditState, MetricsFn
from auditor.pipeline.verdict import ControlFinding
from auditor.refine import DefendedModel, train_refine
from auditor.runtime import CancelFn
from auditor.training import TrainConfig

log = logging.getLogger(__name__)

CONTROL_ARCHITECTURES = ("small_cnn", "resnet18")  # families refine-audit can train; others fall back to small_cnn


def run_control(state: AuditState, name: str, should_cancel: CancelFn, on_metrics: MetricsFn | None) -> dict[str, Any]:
    """Train, defend and score one control; returns its report entry."""
    plan = state.plan.controls
    train_images = take(state.pool, plan.train_images, state.spec.seed + 7)
    if train_images.y is None:
        raise AuditError(ErrorCode.INVALID_DATASET, "Positive controls need labelled (or pseudo-labelled) data.")
    arch = state.arch if state.arch.name in CONTROL_ARCHITECTURES else arch_for(state)
    bd = train_backdoored_model(
        arch, train_images, state.test, AttackConfig(name, target=plan.target, seed=state.spec.seed),
        TrainConfig(epochs=plan.epochs, bf16=state.plan.bf16, batch_size=plan.batch_size),
        device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
    )
    before = attack_metrics(model_predictor(bd.model, state.device), state.test, bd.poisoned_test, plan.target)
    refined = train_refine(
        bd.model, ImageSet(state.pool.x, None), refine_config(state.plan), num_classes=state.num_classes,
        device=state.device, seed=state.spec.seed, should_cancel=should_cancel,
    )
    defended = DefendedModel(refined.transform, bd.model, refined.mapping)
    after = attack_metrics(model_predictor(defended, state.device), state.test, bd.poisoned_test, plan.target)
    _keep_model(state, name, bd)
    _keep_grid(state, name, bd, refined.transform)
    log.info("control %s: before %s after %s", name, before, after)
    if on_metrics is not None:
        on_metrics("evaluate", {"control": name, "asr_before": before.asr, "asr_after": after.asr})
    return {
        "attack": name, "target": plan.target, "poison_rate": bd.attack.poison_rate,
        "no_defense": before.to_dict(), "refine": after.to_dict(),
        "train_seconds": bd.train_seconds, "refine_seconds": refined.seconds,
        "test_images": len(state.test), "triggered_images": int((bd.poisoned_test.y != plan.target).sum()),
    }


def _keep_model(state: AuditState, name: str, bd: Any) -> None:
    bd.save(state.out / "controls" / name)
    control_file = state.out / f"control_{name}.safetensors"
    save_classifier(bd.model, bd.arch, control_file)
    state.add_artifact(control_file.name, control_file, "reference_model", "application/octet-stream")


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
