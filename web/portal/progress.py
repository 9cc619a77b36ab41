"""Words for what an audit is doing, shared by the first render and the live updates.

The page is rendered once on the server and then refreshed from ``status.json``; both
take their text from here, so a reload and a live update never show different wording.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from auditor.errors import ErrorCode
from auditor.report.content import VERDICT_LABELS
from auditor.store.lifecycle import AuditStatus, is_terminal
from auditor.store.models import Audit

STAGE_LABELS = {
    "data": "Loading the data",
    "load": "Loading the model",
    "surrogate": "Distilling a surrogate from the model API",
    "detect": "Reverse-engineering a trigger for each class",
    "refine": "Training the REFINE input transformation",
    "evaluate": "Positive controls and trigger probes",
    "report": "Writing the report",
}
STATUS_LABELS = {
    "queued": "Queued",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
#: What a failure code means for the person reading it, and what to do about it.
FAILURE_ADVICE: dict[str, str] = {
    ErrorCode.INVALID_CHECKPOINT.value: "The model file could not be loaded safely. Upload TorchScript, or safetensors "
    "with the right architecture selected.",
    ErrorCode.INVALID_DATASET.value: "The dataset could not be read. Upload an .npz with x and y arrays, or a zip "
    "with one folder of images per class.",
    ErrorCode.MODEL_DATA_MISMATCH.value: "The model does not fit the data (image size, channels or number of classes).",
    ErrorCode.API_UNREACHABLE.value: "The model API did not answer. Check the URL and that it is reachable from here.",
    ErrorCode.API_AUTH_FAILED.value: "The model API refused the credentials. Check the auth header name and value.",
    ErrorCode.API_BAD_RESPONSE.value: "The model API answered with something that is not a prediction of the chosen protocol.",
    ErrorCode.API_TIMEOUT.value: "The model API took too long to answer.",
    ErrorCode.QUERY_BUDGET_EXHAUSTED.value: "The query budget ran out before the audit finished. Raise the budget.",
    ErrorCode.WORKER_LOST.value: "The machine running the audit stopped responding. Submit it again.",
    ErrorCode.TIME_LIMIT.value: "The audit ran past the time limit. Try a lower effort level.",
    ErrorCode.CANCELLED.value: "The audit was cancelled.",
}
GENERIC_ADVICE = "Something went wrong while running the audit. The log among the files below has the details."


def stage_label(stage: str | None) -> str:
    return STAGE_LABELS.get(stage or "", (stage or "Waiting to start").replace("_", " ").capitalize())


def verdict_label(level: str) -> str:
    """The report's own wording for a verdict level (``auditor.report.content``)."""
    return VERDICT_LABELS.get(level, (level,))[0]


def describe_audit(audit: Audit) -> str:
    """A one-line name for an audit in lists and titles: what model, how hard."""
    spec = audit.spec or {}
    model = spec.get("model") or {}
    effort = spec.get("effort", "standard")
    if model.get("source") == "api":
        url = (model.get("api") or {}).get("url", "")
        return f"Model API {url} ({effort})"
    arch = (model.get("architecture") or {}).get("name")
    return f"Checkpoint{f' ({arch})' if arch else ''}, {effort} effort"


def detail_text(status: str, stage_detail: dict[str, Any] | None) -> str:
    """The current epoch's numbers, e.g. "Epoch 2 of 5 - loss 0.532"; empty when there are none."""
    if status != AuditStatus.RUNNING.value or not stage_detail:
        return ""
    metrics = stage_detail.get("metrics") or {}
    parts = []
    if "epoch" in metrics:
        of = f" of {metrics['epochs']}" if "epochs" in metrics else ""
        parts.append(f"Epoch {metrics['epoch']}{of}")
    for key, label in (("loss", "loss"), ("agreement", "agreement")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {metrics[key]:.3f}")
    if not parts and stage_detail.get("total", 0) > 1:
        parts.append(f"step {stage_detail.get('done', 0)} of {stage_detail['total']}")
    controls = stage_detail.get("parts") or {}  # positive controls running as their own tasks (worker/parts.py)
    if isinstance(controls, dict) and controls:
        parts.append("controls: " + ", ".join(f"{name} {state}" for name, state in sorted(controls.items())))
    return " \u00b7 ".join(parts)


def live_view(audit: Audit) -> dict[str, Any]:
    """Display fields of an audit's progress (also merged into ``status.json``)."""
    status = AuditStatus(audit.status).value
    ended = is_terminal(AuditStatus(audit.status))
    return {
        "status": status,
        "status_label": STATUS_LABELS[status],
        "stage_label": "Finished" if status == "succeeded" else stage_label(audit.stage) if audit.stage else "Waiting to start",
        "percent": round(100 * (1.0 if status == "succeeded" else audit.progress or 0.0)),
        "detail_text": detail_text(status, audit.stage_detail),
        "cancel_requested": audit.cancel_requested,
        "started_text": when(audit.started_at),
        "terminal": ended,
    }


def when(moment: datetime | None) -> str:
    """The portal's one date format (UTC, minutes): lists, pages and live updates agree."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def explain_failure(audit: Audit) -> dict[str, str] | None:
    """Code, message and advice for a failed or cancelled audit, in plain words."""
    status = AuditStatus(audit.status)
    if status not in (AuditStatus.FAILED, AuditStatus.CANCELLED):
        return None
    code = audit.error_code or (ErrorCode.CANCELLED.value if status == AuditStatus.CANCELLED else "")
    return {"code": code, "message": audit.error_message or "", "advice": FAILURE_ADVICE.get(code, GENERIC_ADVICE)}
