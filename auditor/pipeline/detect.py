"""Stage ``detect``: reverse-engineer a trigger per class and flag the class that is far too easy to reach.

The search (auditor/detection/) needs gradients, so it runs on the submitted model
for checkpoint audits and on the distilled surrogate for API audits, before REFINE
refits it. A surrogate is distilled from the API's answers to clean images, so it
rarely inherits the API's backdoor: what the search finds there is evidence about
the surrogate. It is reported as such and does not move the verdict (verdict.py).
The search costs no API query.

API audits then look at the API itself: the label-only search (auditor/detection/
label_only.py) spends the queries the plan reserved (``plan.label_only``) on the
held-out test images, whose API answers the surrogate stage already has. It is
reported as ``detection.label_only`` with its picture ``label-only-maps.png``; it
has not been calibrated on the model zoo, so it does not move the verdict and the
combined score ignores it.

Its picture (mask, pattern, mask x pattern, and held-out images before and after
the trigger is stamped) is written beside the report as ``trigger-recovered.png``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional as F

from auditor.blackbox import api_predictor
from auditor.detection import TriggerSearchConfig, TriggerSearchResult, search_triggers, stamp
from auditor.detection.combined import CALIBRATED_SEARCH_IMAGES, CALIBRATED_SEARCH_STEPS
from auditor.detection.label_only import METHOD, LabelOnlyConfig, LabelOnlyResult, label_only_detection
from auditor.pipeline.state import AuditState
from auditor.pipeline.verdict import (
    TRIGGER_MAX_MASK_FRACTION,
    TRIGGER_MAX_NORM_RATIO,
    TRIGGER_SUCCESS_FLOOR,
    TriggerFinding,
)
from auditor.report.plots import image_grid
from auditor.runtime import CancelFn, ProgressFn

log = logging.getLogger(__name__)

TRIGGER_IMAGE = "trigger-recovered.png"
LABEL_ONLY_IMAGE = "label-only-maps.png"
EXAMPLES = 6  # held-out images shown clean and triggered


def stage_detect(state: AuditState, on_progress: ProgressFn, should_cancel: CancelFn) -> None:
    plan = state.plan.detection
    config = TriggerSearchConfig(steps=plan.steps, images=plan.images, batch_size=plan.batch_size,
                                 holdout_images=plan.holdout_images, seed=state.spec.seed)
    try:
        result = search_triggers(state.model, state.pool, state.test, state.num_classes, config, device=state.device,
                                 on_progress=on_progress, should_cancel=should_cancel)
    except (RuntimeError, AssertionError, ValueError) as exc:
        # Extra evidence, not the audit's purpose: a model the search cannot differentiate through (or an export
        # traced for one batch size) skips it with a warning instead of failing the audit.
        log.warning("trigger search failed: %s", exc)
        state.warnings.append(f"Trigger reverse-engineering could not run on this model ({type(exc).__name__}); the "
                              "report has no detection section.")
        return
    state.detection = result
    state.sections["detection"] = detection_section(result, plan.model, _draw(state, result))
    if state.plan.label_only is not None and state.api is not None:
        _label_only(state, on_progress, should_cancel)


def _label_only(state: AuditState, on_progress: ProgressFn, should_cancel: CancelFn) -> None:
    """The label-only search on the API within the plan's reserved queries, as ``detection.label_only``."""
    plan = state.plan.label_only
    config = LabelOnlyConfig(images_per_class=plan.images_per_class, iterations=plan.rounds,
                             directions=plan.directions, search_steps=plan.search_steps, seed=state.spec.seed)
    assert state.test.y is not None  # the surrogate stage labels unlabelled test images with the API's answers
    try:
        result = label_only_detection(api_predictor(state.api), state.test.x.float() / 255, state.test.y,
                                      state.num_classes, config, plan.queries, on_progress=on_progress,
                                      should_cancel=should_cancel)
    except ValueError as exc:  # the cap cannot pay one image per class: the plan never asks for that
        log.warning("label-only detection did not run: %s", exc)
        state.warnings.append(f"Label-only trigger detection could not run on the API ({exc}).")
        return
    state.sections["detection"]["label_only"] = label_only_section(result, _draw_maps(state, result))


def label_only_section(result: LabelOnlyResult, image: str | None) -> dict[str, Any]:
    """The report's ``detection.label_only`` (auditor/report/schema.py, ``LabelOnlyDetection``)."""
    c = result.config
    return {
        "method": METHOD, "calibrated": False, "counts_toward_verdict": False,
        "suspected_class": result.suspected_class, "anomaly_index": round(result.anomaly_index, 4),
        "peaks": [round(p, 4) for p in result.peaks],
        "anomaly_indices": [round(v, 4) for v in result.anomaly_indices],
        "peak_pixels": [list(p) for p in result.peak_pixels], "images": list(result.images),
        "images_per_class": c.images_per_class, "rounds": c.iterations, "directions": c.directions,
        "search_steps": c.search_steps, "queries": result.queries, "query_cap": result.query_cap,
        "seconds": result.seconds, "image": image,
    }


def _draw_maps(state: AuditState, result: LabelOnlyResult) -> str | None:
    """Every class's boundary map as the peak reads it (window means, scaled to its own maximum) under a held-out
    image of that class."""
    w = result.config.peak_window
    smooth = F.avg_pool2d(result.maps.unsqueeze(1), w, stride=1, padding=w // 2, count_include_pad=False)
    smooth = smooth[..., :result.maps.shape[1], :result.maps.shape[2]]
    maps = smooth / smooth.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    examples = [state.test.x[state.test.y == k][:1].float() / 255 for k in range(state.num_classes)]
    blank = torch.zeros(1, *state.test.x.shape[1:])
    rows = {"class image": torch.cat([e if len(e) else blank for e in examples]), f"map ({w}x{w} mean)": maps}
    title = f"Label-only maps, peak: {state.data_info['class_names'][result.suspected_class]} (not calibrated)"
    try:
        image_grid(rows, state.out / LABEL_ONLY_IMAGE, title=title, max_images=state.num_classes)
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("could not draw the label-only maps: %s", exc)
        return None
    return LABEL_ONLY_IMAGE


def trigger_finding(state: AuditState, probe_class: int | None) -> TriggerFinding | None:
    """What the verdict reads from the search (None when it did not run), beside the probes' suspected class."""
    result: TriggerSearchResult | None = state.detection
    if result is None:
        return None
    plan = state.plan.detection
    calibrated = plan.steps >= CALIBRATED_SEARCH_STEPS and plan.images >= CALIBRATED_SEARCH_IMAGES
    return TriggerFinding(result.suspected_class, result.anomaly_index, result.norm_ratio, result.mask_fraction,
                          result.success, on_surrogate=plan.model == "surrogate", calibrated=calibrated,
                          probe_class=probe_class)


def record_probe_agreement(state: AuditState, finding: TriggerFinding | None) -> None:
    """The probes run after the search: only then does the report's detection section learn whether the two name
    one class, and so whether the trigger counts."""
    section = state.sections.get("detection")
    if finding is not None and section is not None:
        section.update(agrees_with_probes=finding.agrees_with_probes, counts_toward_verdict=finding.counts)


def detection_section(result: TriggerSearchResult, model: str, image: str | None) -> dict[str, Any]:
    """The report's ``detection`` section (auditor/report/schema.py, ``Detection``); whether it agrees with the
    probes, and so counts, is filled in once they ran (``record_probe_agreement``)."""
    finding = TriggerFinding(result.suspected_class, result.anomaly_index, result.norm_ratio, result.mask_fraction,
                             result.success, model == "surrogate")
    return {
        "model": model, "suspected_class": result.suspected_class,
        "anomaly_index": round(result.anomaly_index, 4), "norm_ratio": round(result.norm_ratio, 4),
        "max_norm_ratio": TRIGGER_MAX_NORM_RATIO, "flagged": result.flagged,
        "success": result.success.to_dict(), "recovered": finding.recovered,
        "agrees_with_probes": finding.agrees_with_probes, "counts_toward_verdict": finding.counts,
        "anomaly_threshold": finding.anomaly_threshold,
        "success_floor": TRIGGER_SUCCESS_FLOOR, "max_mask_fraction": TRIGGER_MAX_MASK_FRACTION,
        "mask_norms": [round(v, 4) for v in result.mask_norms],
        "anomaly_indices": [round(v, 4) for v in result.anomaly_indices],
        "reached": list(result.reached), "mask_fraction": min(1.0, max(0.0, result.mask_fraction)),
        "steps": result.steps, "images": result.images, "seconds": result.seconds, "image": image,
    }


def _draw(state: AuditState, result: TriggerSearchResult) -> str | None:
    """Mask, pattern and held-out images with the trigger stamped; None (and a log line) if drawing fails."""
    others = state.test.y != result.suspected_class
    clean = state.test.x[others][:EXAMPLES].float() / 255
    mask, pattern = result.mask, result.pattern
    rows = {
        "clean": clean, "triggered": stamp(clean, mask, pattern),
        "mask": mask.unsqueeze(0), "pattern": pattern.unsqueeze(0), "mask \u00d7 pattern": (mask * pattern).unsqueeze(0),
    }
    title = f"Recovered trigger for class {state.data_info['class_names'][result.suspected_class]}"
    try:
        image_grid({k: v.clamp(0, 1) for k, v in rows.items()}, state.out / TRIGGER_IMAGE, title=title)
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("could not draw the recovered trigger: %s", exc)
        return None
    return TRIGGER_IMAGE
