"""Stage ``detect``: reverse-engineer a trigger per class and flag the class that is far too easy to reach.

The search (auditor/detection/) needs gradients, so it runs on the submitted model
for checkpoint audits and on the distilled surrogate for API audits, before REFINE
refits it. A surrogate is distilled from the API's answers to clean images, so it
rarely inherits the API's backdoor: what the search finds there is evidence about
the surrogate. It is reported as such and does not move the verdict (verdict.py).
The search costs no API query.

Its picture (mask, pattern, mask x pattern, and held-out images before and after
the trigger is stamped) is written beside the report as ``trigger-recovered.png``.
"""

from __future__ import annotations

import logging
from typing import Any

from auditor.detection import TriggerSearchConfig, TriggerSearchResult, search_triggers, stamp
from auditor.detection.combined import CALIBRATED_SEARCH_IMAGES, CALIBRATED_SEARCH_STEPS
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


def trigger_finding(state: AuditState) -> TriggerFinding | None:
    """What the verdict reads from the search (None when it did not run)."""
    result: TriggerSearchResult | None = state.detection
    if result is None:
        return None
    plan = state.plan.detection
    calibrated = plan.steps >= CALIBRATED_SEARCH_STEPS and plan.images >= CALIBRATED_SEARCH_IMAGES
    return TriggerFinding(result.suspected_class, result.anomaly_index, result.norm_ratio, result.mask_fraction,
                          result.success, on_surrogate=plan.model == "surrogate", calibrated=calibrated)


def detection_section(result: TriggerSearchResult, model: str, image: str | None) -> dict[str, Any]:
    """The report's ``detection`` section (auditor/report/schema.py, ``Detection``)."""
    finding = TriggerFinding(result.suspected_class, result.anomaly_index, result.norm_ratio, result.mask_fraction,
                             result.success, model == "surrogate")
    return {
        "model": model, "suspected_class": result.suspected_class,
        "anomaly_index": round(result.anomaly_index, 4), "norm_ratio": round(result.norm_ratio, 4),
        "max_norm_ratio": TRIGGER_MAX_NORM_RATIO, "flagged": result.flagged,
        "success": result.success.to_dict(), "recovered": finding.recovered,
        "counts_toward_verdict": finding.counts, "anomaly_threshold": finding.anomaly_threshold,
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
