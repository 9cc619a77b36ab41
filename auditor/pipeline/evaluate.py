"""Stage ``evaluate``: what the defense costs, what the probes see, and whether REFINE removes planted backdoors.

Three measurements, each on the sizes the plan fixed:

* **utility**: BA of the submitted and the defended model on the clean test images,
  their agreement and prediction histograms (for API models, "after" queries the
  real API through T and M);
* **probes**: the suspicion score of the submitted model and of the defended one,
  each with its images and a bootstrap interval. API audits run the compact
  battery. The defended model is re-probed with the probes that gave the
  strongest evidence only (five for an API, twenty for a checkpoint: the plan's
  ``after_probes``): REFINE's effect shows where the evidence was, and the rest
  of the battery cost a checkpoint audit most of its evaluation time. With so
  few probes there is no default class to discount, so the "after" score can
  only err high;
* **positive controls** (``controls.py``).

The results become report sections and the ``Findings`` the gates and the
verdict read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from auditor.blackbox import defended_api_predictor
from auditor.evaluation import Predictor, accuracy, agreement, confusion, model_predictor, per_class_accuracy
from auditor.evaluation import predict_labels
from auditor.evaluation.intervals import Interval, share_interval
from auditor.evaluation.probes import SuspicionReport, suspicion_score
from auditor.pipeline.controls import control_findings, run_control
from auditor.pipeline.detect import record_probe_agreement, trigger_finding
from auditor.pipeline.load import reference_predictor
from auditor.pipeline.plan import probe_config
from auditor.pipeline.state import AuditState, MetricsFn
from auditor.pipeline.verdict import Findings
from auditor.refine import DefendedModel, inference_transform
from auditor.runtime import CancelFn, ProgressFn, check_cancel


def stage_evaluate(state: AuditState, on_progress: ProgressFn, should_cancel: CancelFn,
                   on_metrics: MetricsFn | None) -> None:
    attacks = state.plan.controls.attacks
    total = 2 + len(attacks)
    on_progress("evaluate", 0, total)
    state.sections["utility"] = _utility(state)
    check_cancel(should_cancel)
    on_progress("evaluate", 1, total)
    before, after = _probe(state)
    state.sections["probes"] = {"before": _probe_section(before), "after": _probe_section(after)}
    on_progress("evaluate", 2, total)
    controls = []
    for i, name in enumerate(attacks):
        check_cancel(should_cancel)
        controls.append(run_control(state, name, should_cancel, on_metrics))
        on_progress("evaluate", 3 + i, total)
    state.sections["positive_controls"] = controls
    state.grids["submitted model"] = _transformed_grid(state)
    state.findings = _findings(state, before, after)
    record_probe_agreement(state, state.findings.trigger)


def defended_predictor(state: AuditState) -> Predictor:
    """M ∘ model ∘ T; for API models every answer comes from the real API."""
    if state.api is not None:
        return defended_api_predictor(state.api, state.refine.transform, state.refine.mapping, device=state.device)
    transform = inference_transform(state.refine.transform)
    return model_predictor(DefendedModel(transform, state.model, state.refine.mapping), state.device)


def _utility(state: AuditState) -> dict[str, Any]:
    k, test = state.num_classes, state.test
    before = predict_labels(reference_predictor(state), test)
    after = predict_labels(defended_predictor(state), test)
    labelled = test.y is not None
    return {
        "ba_before": accuracy(before, test.y) if labelled else None,
        "ba_after": accuracy(after, test.y) if labelled else None,
        "agreement": agreement(after, before),
        "per_class_accuracy_before": per_class_accuracy(before, test.y, k) if labelled else None,
        "per_class_accuracy_after": per_class_accuracy(after, test.y, k) if labelled else None,
        "confusion_after": confusion(after, test.y, k).tolist() if labelled else None,
        "test_images": len(test),
        "predictions_before": _histogram(before, k),
        "predictions_after": _histogram(after, k),
    }


def _histogram(predictions: torch.Tensor, k: int) -> list[int]:
    return torch.bincount(predictions.long(), minlength=k)[:k].tolist()


def _probe(state: AuditState) -> tuple[SuspicionReport, SuspicionReport]:
    """The submitted model's score on the plan's battery, then the defended model's (module docstring)."""
    plan = state.plan.probes
    config = probe_config(plan.battery == "api", plan.images, state.spec.seed)
    before = suspicion_score(reference_predictor(state), state.test, config, num_classes=state.num_classes)
    if plan.after_probes < plan.probes:
        strongest = tuple(r.probe for r in sorted(before.results, key=lambda r: r.score, reverse=True))
        config = replace(config, only=strongest[: plan.after_probes], discount_default=False)
    after = suspicion_score(defended_predictor(state), state.test, config, num_classes=state.num_classes)
    return before, after


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


def score_interval(result: SuspicionReport) -> Interval:
    low, high = result.interval or (result.score, result.score)
    return Interval(_fraction(result.score), result.num_images, _fraction(low), _fraction(high))


def _findings(state: AuditState, before: SuspicionReport, after: SuspicionReport) -> Findings:
    utility, n = state.sections["utility"], len(state.test)
    labelled = utility["ba_before"] is not None
    return Findings(
        class_names=tuple(state.data_info["class_names"]),
        agreement=share_interval(utility["agreement"], n),
        histogram_before=tuple(utility["predictions_before"]), histogram_after=tuple(utility["predictions_after"]),
        probe_images=before.num_images, suspicion_before=score_interval(before), suspicion_after=score_interval(after),
        suspect_class=before.suspect_class,
        ba_before=share_interval(utility["ba_before"], n) if labelled else None,
        ba_after=share_interval(utility["ba_after"], n) if labelled else None,
        surrogate_agreement=state.sections.get("surrogate_agreement"),
        controls=control_findings(state.sections["positive_controls"]),
        trigger=trigger_finding(state, before.suspect_class),
        probe_battery=state.plan.probes.battery,
    )


def _transformed_grid(state: AuditState) -> dict[str, torch.Tensor]:
    sample = state.test.x[:8].float() / 255
    with torch.no_grad():
        return {"clean": sample, "transformed by T": state.refine.transform(sample.to(state.device)).cpu()}


def _fraction(value: Any) -> float:
    return min(1.0, max(0.0, float(value)))
