"""The report inside the audit page: report.json from the artifact store, laid out for a screen.

The words and tables come from ``auditor.report.content.build_view``, the same view the
HTML and PDF renderers use, so the three never disagree. The portal adds what a page
can do better than a file: a crisp inline SVG chart of the positive controls, and the
PNG figures served from the audit's artifacts instead of being inlined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from auditor.errors import AuditError
from auditor.report.content import ReportView, build_view
from auditor.report.schema import (
    PositiveControl,
    Report,
    ReportValidationError,
    validate_report,
)
from auditor.store.models import Artifact
from web.api.audits import service

CHART_COLOURS = {"ba_before": "#98a2b3", "ba_after": "#475467", "asr_before": "#f97066", "asr_after": "#b42318"}
CHART_LEGEND = [
    ("ba_before", "BA, no defense"), ("ba_after", "BA, REFINE"),
    ("asr_before", "ASR, no defense"), ("asr_after", "ASR, REFINE"),
]


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str  # for the tooltip and screen readers
    value_text: str  # printed above the bar, so a 0% bar is still visibly there


@dataclass
class Chart:
    """A grouped bar chart, coordinates precomputed so the template only draws."""

    width: int
    height: int
    plot_top: int
    plot_bottom: int
    bars: list[Bar] = field(default_factory=list)
    groups: list[tuple[float, str]] = field(default_factory=list)  # (centre x, attack name)
    gridlines: list[tuple[float, str]] = field(default_factory=list)  # (y, "50%")
    legend: list[tuple[str, str]] = field(default_factory=list)  # (colour, text)


@dataclass
class ReportPage:
    report: Report
    view: ReportView
    chart: Chart | None
    files: list[Artifact]  # every stored file of the audit, for the download list


def load_report_page(owner_id: int, audit_id: str) -> ReportPage | None:
    """The report of an ended audit, or None when it has none (e.g. cancelled while queued)."""
    try:
        artifact = service.report_of(owner_id, audit_id, "json")
        report = validate_report(json.loads(b"".join(service.open_artifact(artifact))))
    except (AuditError, ReportValidationError, ValueError):
        return None
    files = service.artifacts_of(owner_id, audit_id)
    return ReportPage(report, build_view(report), controls_chart(report.positive_controls), files)


def controls_chart(controls: list[PositiveControl], *, width: int = 640, height: int = 260) -> Chart | None:
    """BA and ASR before and after REFINE, four bars per attack; a fraction maps to height."""
    if not controls:
        return None
    left, right, top, bottom = 48, 12, 16, height - 36
    chart = Chart(width, height, top, bottom, legend=[(CHART_COLOURS[k], text) for k, text in CHART_LEGEND])
    chart.gridlines = [(bottom - (bottom - top) * f, f"{f:.0%}") for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    group_width = (width - left - right) / len(controls)
    bar_width = min(28.0, group_width * 0.8 / 4)
    for i, control in enumerate(controls):
        centre = left + group_width * (i + 0.5)
        chart.groups.append((centre, control.attack))
        values = {
            "ba_before": control.no_defense.ba, "ba_after": control.refine.ba,
            "asr_before": control.no_defense.asr, "asr_after": control.refine.asr,
        }
        for j, (key, text) in enumerate(CHART_LEGEND):
            bar_height = (bottom - top) * values[key]
            x = centre - 2 * bar_width + j * bar_width
            label = f"{control.attack}: {text} {values[key]:.1%}"
            chart.bars.append(
                Bar(x, bottom - bar_height, bar_width - 2, bar_height, CHART_COLOURS[key], label, f"{values[key]:.0%}")
            )
    return chart
