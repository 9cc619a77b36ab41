"""Stage ``surrogate`` (API audits): distil a local stand-in for the API that REFINE can train through.

The plan fixes how many API answers distillation may use; the rest of the budget
is already spoken for (refits, evaluation, probes). Right after distillation the
surrogate is compared with the API on the evaluation's clean test images: those
answers are needed for the "before" BA anyway and the client caches them, so the
agreement figure costs no extra query and rests on the full evaluation sample.
"""

from __future__ import annotations

from pathlib import Path

import torch

from auditor.blackbox import DistillConfig, RefitConfig, SurrogateRefitter, distill_surrogate
from auditor.data import ImageSet
from auditor.evaluation import model_predictor, predict_labels
from auditor.evaluation.intervals import share_interval
from auditor.models import save_classifier
from auditor.pipeline.load import reference_predictor
from auditor.pipeline.state import AuditState
from auditor.runtime import CancelFn, ProgressFn
from auditor.training import TrainConfig

DISTILL_HOLDOUT = 0.0  # agreement is measured on the evaluation's test images, so no pool answer is held out


def stage_surrogate(state: AuditState, on_progress: ProgressFn, should_cancel: CancelFn) -> None:
    plan = state.plan.surrogate
    config = DistillConfig(query_budget=plan.distill_queries, holdout_fraction=DISTILL_HOLDOUT,
                           train=TrainConfig(epochs=plan.distill_epochs, bf16=state.plan.bf16))
    result = distill_surrogate(state.api, state.pool, state.arch, config, device=state.device, seed=state.spec.seed,
                               on_progress=on_progress, should_cancel=should_cancel)
    state.model, state.distilled = result.model, result
    api_answers = predict_labels(reference_predictor(state), state.test)  # the "before" queries, cached for later
    if state.test.y is None:
        _label_with(state, api_answers)
    agreement = float((predict_labels(model_predictor(result.model, state.device), state.test) == api_answers)
                      .float().mean())
    save_surrogate(state)
    state.sections["surrogate"] = {
        "architecture": state.arch.name,
        "agreement_clean": agreement,
        "agreement_images": len(state.test),
        "history": [
            {"epoch": int(h["epoch"]), "loss": float(h["loss"]), "agreement": _fraction(h.get("train_accuracy"))}
            for h in result.history
        ],
    }
    state.sections["surrogate_agreement"] = share_interval(agreement, len(state.test))


def _label_with(state: AuditState, api_answers: torch.Tensor) -> None:
    """Unlabelled data: the API's answers label the test images, the surrogate labels the pool (no extra query)."""
    pool_labels = predict_labels(model_predictor(state.model, state.device), state.pool)
    state.test = ImageSet(state.test.x, api_answers, state.test.class_names)
    state.pool = ImageSet(state.pool.x, pool_labels, state.pool.class_names)


def save_surrogate(state: AuditState) -> None:
    """Saved after distillation and again after refits changed it: the artifact is the surrogate REFINE ended with."""
    path = state.out / "surrogate.safetensors"
    save_classifier(state.model, state.arch, path)
    state.add_artifact(path.name, path, "surrogate", "application/octet-stream")


def surrogate_refitter(state: AuditState, refine_epochs: int, checkpoint_dir: Path,
                       should_cancel: CancelFn) -> SurrogateRefitter | None:
    """REFINE's ``adapt_model`` hook for API audits: refits on the API's answers to T(x), within the plan's queries."""
    plan = state.plan.surrogate
    if state.distilled is None or plan is None or plan.refit_queries == 0:
        return None
    refit = RefitConfig(query_budget=plan.refit_queries, rounds=plan.refit_rounds, bf16=state.plan.bf16)
    return SurrogateRefitter(state.api, state.distilled, state.pool, refine_epochs, refit, device=state.device,
                             seed=state.spec.seed, state_dir=checkpoint_dir, should_cancel=should_cancel)


def _fraction(value: object) -> float | None:
    return None if value is None else min(1.0, max(0.0, float(value)))
