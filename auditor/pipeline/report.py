"""Stage ``report``: the report dict (the contract in auditor/report/schema.py), its files, and the row summary.

A failed or cancelled audit still gets a report saying what happened and what was
measured before it stopped; a succeeded one adds the gates, the verdict, the
defended model's fitness and ``figures``: every headline number with the images
behind it and its 95% interval.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from auditor.errors import AuditError
from auditor.evaluation.intervals import Interval, share_interval
from auditor.models.checkpoints import sha256_file
from auditor.pipeline.load import url_without_credentials
from auditor.pipeline.state import AuditState
from auditor.pipeline.verdict import Conclusion, conclude
from auditor.report import write_report
from auditor.report.schema import Software

log = logging.getLogger(__name__)

CONTENT_TYPES = {".json": "application/json", ".html": "text/html", ".pdf": "application/pdf", ".png": "image/png"}


def write_outputs(state: AuditState, status: str, error: AuditError | None) -> dict[str, Any]:
    """Validate and write report.json/.html/.pdf and the PNGs; register them as artifacts; return the report."""
    report = report_dict(state, status, error)
    report["artifacts"] = [
        {"name": a.name, "kind": a.kind, "size": a.path.stat().st_size, "sha256": sha256_file(a.path)}
        for a in state.artifacts
    ]
    written = write_report(report, state.out, images=state.grids or None)
    for name, path in written.items():
        kind = "report" if name.startswith("report.") else "image"
        state.add_artifact(name, path, kind, CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream"))
    state.add_artifact("audit.log", state.out / "audit.log", "log", "text/plain")
    return json.loads((state.out / "report.json").read_text())


def report_dict(state: AuditState, status: str, error: AuditError | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "audit_id": state.inputs.audit_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "status": status,
        "spec": state.spec.redacted(),
        "plan": state.plan.to_dict() if state.plan else None,
        "seed": state.spec.seed,
        "software": Software.current(str(state.device)).model_dump(),
        "inputs": {"model": state.model_info or _fallback_model_info(state), "data": state.data_info or None},
        "timings": {"stages": {k: v for k, v in state.timings.items() if k != "total"},
                    "total": state.timings.get("total", sum(state.timings.values()))},
        "warnings": list(state.warnings),
    }
    if error is not None:
        report["error"] = {"code": error.code.value, "message": error.message}
    if state.api is not None:
        report["queries"] = _queries(state)
    if "surrogate" in state.sections:
        report["surrogate"] = state.sections["surrogate"]
    if state.refine is not None:
        report["refine"] = _refine_section(state)
    for key in ("utility", "probes", "positive_controls", "detection"):
        if key in state.sections:
            report[key] = state.sections[key]
    report["images"] = _detection_images(state.sections.get("detection") or {})
    if status == "succeeded":
        _add_conclusion(report, state, conclude(state.findings))
    return report


def _detection_images(detection: dict[str, Any]) -> list[dict[str, str]]:
    """The recovered trigger's picture and the label-only maps, when they were drawn."""
    images = []
    if detection.get("image"):
        images.append({"file": detection["image"], "caption": "Recovered trigger: held-out images clean and with the "
                                                              "trigger stamped, the mask, the pattern and mask \u00d7 "
                                                              "pattern"})
    label_only = detection.get("label_only") or {}
    if label_only.get("image"):
        images.append({"file": label_only["image"], "caption": "Label-only detection on the API: each class's "
                                                               "boundary map (bright: pixels the boundary hinges on) "
                                                               "under a held-out image of the class; not calibrated"})
    return images


def _add_conclusion(report: dict[str, Any], state: AuditState, conclusion: Conclusion) -> None:
    report["verdict"] = conclusion.verdict
    report["gates"] = [{**asdict(g), "interval": list(g.interval) if g.interval else None} for g in conclusion.gates]
    report["defended_model"] = {"fit_to_deploy": conclusion.fitness.fit_to_deploy, "reason": conclusion.fitness.reason}
    report["figures"] = {name: interval.to_dict() for name, interval in figures(state).items()}
    report["warnings"] += [_sentence(g.reason) for g in conclusion.tripped if g.reason]
    log.info("verdict %s; gates tripped: %s", conclusion.verdict["level"], [g.name for g in conclusion.tripped])


def figures(state: AuditState) -> dict[str, Interval]:
    """The headline numbers with n and 95% interval, under the names the row summary uses."""
    f = state.findings
    out: dict[str, Interval] = {"agreement": f.agreement, "suspicion_before": f.suspicion_before,
                                "suspicion_after": f.suspicion_after}
    if f.ba_before is not None and f.ba_after is not None:
        out.update(ba_before=f.ba_before, ba_after=f.ba_after)
    if f.surrogate_agreement is not None:
        out["surrogate_agreement"] = f.surrogate_agreement
    if f.trigger is not None:
        out["trigger_success"] = f.trigger.success
    controls = state.sections.get("positive_controls") or []
    if controls:
        for side, key in (("no_defense", "controls_asr_before"), ("refine", "controls_asr_after")):
            worst = max(controls, key=lambda c: c[side]["asr"])
            out[key] = share_interval(worst[side]["asr"], worst["triggered_images"])
    return out


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _queries(state: AuditState) -> dict[str, Any]:
    counters = state.api.counters()
    return {
        "queries_used": int(counters.get("queries_used", 0)), "budget": state.spec.model.api.query_budget,
        "requests": int(counters.get("requests_sent", 0)), "seconds": float(counters.get("seconds_spent", 0.0)),
        "cache_hits": int(counters.get("cache_hits", 0)),
    }


def _refine_section(state: AuditState) -> dict[str, Any]:
    result = state.refine
    return {
        "config": result.config.to_dict(),
        "mapping": result.mapping.tolist(),
        "history": [
            {"epoch": int(h["epoch"]), "loss": h["loss"], "ce": h["fit"], "supcon": h["supcon"],
             "seconds": h["seconds"], "lr": h["lr"]}
            for h in result.history
        ],
        "seconds": result.seconds,
        "exports": state.sections.get("exports", []),
    }


def _fallback_model_info(state: AuditState) -> dict[str, Any]:
    if state.spec.model.source == "api":
        return {"source": "api", "format": state.spec.model.api.protocol,
                "url": url_without_credentials(str(state.spec.model.api.url))}
    path = state.inputs.model_path
    digest = sha256_file(path) if path is not None and Path(path).is_file() else "0" * 64
    return {"source": "checkpoint", "format": "unknown", "sha256": digest}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers list views and webhooks show, with their intervals and the gates that tripped."""
    out: dict[str, Any] = {"status": report["status"]}
    verdict = report.get("verdict")
    if verdict:
        out.update(verdict=verdict["level"], headline=verdict["headline"], probe_level=verdict["probe_level"],
                   suspicion_before=verdict["suspicion_before"], suspicion_after=verdict["suspicion_after"])
        combined = verdict.get("combined")
        if combined:  # what gated pipelines read when the verdict is inconclusive (remote_cli.py)
            out.update(combined_score=combined["score"], score_level=combined["level"])
    if report.get("utility"):
        out.update({k: report["utility"][k] for k in ("ba_before", "ba_after", "agreement")})
    controls = report.get("positive_controls") or []
    if controls:
        out["controls_asr_before"] = max(c["no_defense"]["asr"] for c in controls)
        out["controls_asr_after"] = max(c["refine"]["asr"] for c in controls)
    detection = report.get("detection")
    if detection:
        # flat scalars: the sandbox passes only those back (auditor/sandbox/launcher.py)
        out.update(trigger_model=detection["model"], trigger_class=detection["suspected_class"],
                   trigger_anomaly_index=detection["anomaly_index"], trigger_recovered=detection["recovered"],
                   trigger_success=detection["success"]["value"])
    if report.get("queries"):
        out["queries_used"] = report["queries"]["queries_used"]
    if report.get("gates") is not None:
        out["gates_tripped"] = [g["name"] for g in report["gates"] if g["tripped"]]
        out["fit_to_deploy"] = report["defended_model"]["fit_to_deploy"]
        out["intervals"] = report["figures"]
    return out
