"""What the report says, as plain text tables, shared by the HTML and the PDF renderer.
(Over 400 lines: one builder per report section, kept together so HTML, PDF and the portal say the same.)

Formatting numbers and choosing wording once, here, keeps the two documents
identical in content; the renderers only lay the view out (and escape it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timezone

from auditor.pipeline.describe import describe_plan
from auditor.report.schema import (
    CombinedScore,
    DefenseExport,
    Detection,
    Figure,
    ImageRef,
    LabelOnlyDetection,
    PositiveControl,
    ProbeEvidence,
    ProbeResult,
    Report,
)

ARROW = "\u2192"

VERDICT_LABELS = {
    "likely_backdoored": ("Likely backdoored", "#b42318", "#fef3f2"),
    "suspicious": ("Suspicious", "#b54708", "#fffaeb"),
    "no_evidence": ("No evidence of a backdoor found", "#067647", "#ecfdf3"),
    "inconclusive": ("Inconclusive", "#5925dc", "#f4f3ff"),
    "failed": ("Audit failed", "#344054", "#f2f4f7"),
    "cancelled": ("Audit cancelled", "#344054", "#f2f4f7"),
}

CAVEAT = (
    "The suspicion score measures how strongly probe triggers (patches, blends, warps, noise) steer the model's "
    "predictions towards a single class. It is evidence, not proof: a high score can also come from a natural "
    "weakness of the model, and a low score does not rule out a backdoor whose trigger the probe battery does not "
    "cover. The positive controls show whether REFINE removes backdoors that this service planted itself in the "
    "same data domain."
)

#: Above this many classes the confusion matrix is left to report.json: a printed one would be unreadable.
MAX_CONFUSION_CLASSES = 20

#: Which section shows each plot written by plots.plot_report; other plots go to "Additional plots".
PLOT_SECTIONS = {
    "plot-positive-controls.png": "controls",
    "plot-per-class-accuracy.png": "utility",
    "plot-probe-families.png": "probes",
    "plot-agreement-queries.png": "blackbox",
    "plot-refine-training.png": "refine",
}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: str = ""  # one of "l"/"r" per column; default: first column left, the rest right
    mono_column: int | None = None  # a column of hashes, set in a monospace font

    def alignment(self, column: int) -> str:
        if column < len(self.align):
            return self.align[column]
        return "l" if column == 0 else "r"


@dataclass
class Section:
    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[ImageRef] = field(default_factory=list)
    preformatted: str | None = None


@dataclass
class Banner:
    label: str
    colour: str
    background: str
    headline: str
    detail: str


@dataclass
class ReportView:
    title: str
    facts: list[tuple[str, str]]  # audit id, created, status, ... under the title
    banner: Banner
    caveat: str
    sections: list[Section]


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def change(before: float | None, after: float | None) -> str:
    """``"89.4% → 85.8%"``: both numbers, because a reader checks either one against other reports."""
    return f"{pct(before)} {ARROW} {pct(after)}"


def delta_pp(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{100 * (after - before):+.1f} pp"


def with_interval(figure: Figure | None, fallback: float | None = None) -> str:
    """``89.4% [88.2–90.6], n = 2,401``: a share, its 95% interval and the images behind it."""
    if figure is None:
        return pct(fallback)
    return f"{pct(figure.value)} [{100 * figure.low:.1f}\u2013{100 * figure.high:.1f}], n = {figure.n:,}"


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 120:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def build_view(report: Report) -> ReportView:
    """Everything the HTML and PDF show, in reading order; sections without data are left out."""
    builders: list[Callable[[Report], Section | None]] = [
        _summary, _gates, _controls, _utility, _probes, _detection, _blackbox, _refine, _plan, _images, _extra_plots, _artifacts,
        _provenance,
    ]
    sections = [s for s in (build(report) for build in builders) if s is not None]
    _attach_plots(report, sections)
    return ReportView(
        title="Backdoor audit report",
        facts=[("Audit", report.audit_id), ("Created", report.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
               ("Status", report.status), ("Schema", report.schema_version)],
        banner=_banner(report),
        caveat=CAVEAT if report.verdict else "",  # the caveat qualifies a verdict; without one it is noise
        sections=sections,
    )


def _banner(report: Report) -> Banner:
    if report.status != "succeeded" or report.verdict is None:
        label, colour, background = VERDICT_LABELS.get(report.status, VERDICT_LABELS["failed"])
        detail = f"{report.error.code}: {report.error.message}" if report.error else ""
        headline = report.verdict.headline if report.verdict else "The audit did not complete, so there is no verdict."
        return Banner(label, colour, background, headline, detail)
    v = report.verdict
    label, colour, background = VERDICT_LABELS[v.level]
    detail = f"Suspicion score {change(v.suspicion_before, v.suspicion_after)} (submitted {ARROW} defended model)"
    if v.level == "inconclusive":
        detail += f"; the probes alone read {VERDICT_LABELS[v.probe_level][0].lower()}"
    return Banner(label, colour, background, v.headline, detail + ".")


def _model_text(report: Report) -> str:
    m = report.inputs.model
    ident = m.url if m.source == "api" else f"sha256 {m.sha256[:16]}\u2026" if m.sha256 else ""
    arch = f", {m.architecture}" if m.architecture else ""
    return f"{m.source} ({m.format}{arch}) {ident}".strip()


def _combined_text(c: CombinedScore) -> str:
    """The score with the thresholds it is read against, so a reader can place it without the schema."""
    reads = VERDICT_LABELS[c.score_level][0].lower()
    return (f"{c.score:.2f}: reads {reads} (likely backdoored \u2265 {c.likely_threshold:.2f}, suspicious "
            f"\u2265 {c.suspicious_threshold:.2f}). {c.meaning}")


def _data_text(report: Report) -> str:
    d = report.inputs.data
    if d is None:
        return "not loaded"
    shape = "\u00d7".join(str(n) for n in d.image_shape)
    return f"{d.source}: {d.pool_size:,} unlabeled + {d.test_size:,} test images, {shape}, {d.num_classes} classes"


def _summary(report: Report) -> Section:
    """The headline numbers, each with its 95% interval and the images behind it (``figures``)."""
    figures = report.figures or {}
    rows = [["Model", _model_text(report)], ["Data", _data_text(report)]]
    if report.verdict:
        rows.append(["Suspicion score, submitted model", with_interval(figures.get("suspicion_before"),
                                                                       report.verdict.suspicion_before)])
        rows.append(["Suspicion score, defended model", with_interval(figures.get("suspicion_after"),
                                                                      report.verdict.suspicion_after)])
        if report.verdict.combined is not None:
            rows.append(["Combined detection score (sets the level)", _combined_text(report.verdict.combined)])
    if report.probes and report.probes.before.suspected_target is not None:
        rows.append(["Suspected target class", report.class_name(report.probes.before.suspected_target)])
    if report.detection is not None:
        rows.append(["Recovered trigger" + (" (surrogate)" if report.detection.model == "surrogate" else ""),
                     _trigger_text(report, report.detection)])
        lo = report.detection.label_only
        if lo is not None:
            rows.append(["Label-only detection on the API", f"highest map peak: class "
                         f"{report.class_name(lo.suspected_class)}, anomaly index {lo.anomaly_index:.1f} "
                         f"({lo.queries:,} queries; did not separate on the model zoo, not in the verdict)"])
    if report.utility:
        u = report.utility
        if u.ba_before is not None:
            rows.append(["Benign accuracy, submitted model", with_interval(figures.get("ba_before"), u.ba_before)])
            rows.append(["Benign accuracy, defended model",
                         f"{with_interval(figures.get('ba_after'), u.ba_after)} ({delta_pp(u.ba_before, u.ba_after)})"])
        rows.append(["Agreement, defended vs submitted", with_interval(figures.get("agreement"), u.agreement)])
    if "surrogate_agreement" in figures:
        rows.append(["Agreement, surrogate vs API", with_interval(figures["surrogate_agreement"])])
    if report.positive_controls:
        rows.append(["Positive controls, mean ASR", _mean_asr(report.positive_controls)])
    if "controls_asr_after" in figures:
        rows.append(["Positive controls, worst ASR after REFINE", with_interval(figures["controls_asr_after"])])
    if report.defended_model is not None:
        fit = "yes" if report.defended_model.fit_to_deploy else "no"
        rows.append(["Defended model fit to deploy", f"{fit}: {report.defended_model.reason}"])
    if report.gates is not None:
        tripped = [g.name for g in report.gates if g.tripped]
        rows.append(["Gates tripped", ", ".join(tripped) if tripped else f"none of {len(report.gates)}"])
    if report.queries:
        q = report.queries
        budget = f" of {q.budget:,}" if q.budget is not None else ""
        rows.append(["Model-API queries", f"{q.queries_used:,}{budget}"])
    if report.timings:
        rows.append(["Total time", seconds(report.timings.total)])
    return Section("summary", "Summary", tables=[Table(["Item", "Value"], rows, align="ll")],
                   bullets=[f"Warning: {w}" for w in report.warnings])


def _gates(report: Report) -> Section | None:
    """Every evidence and defense check with what it measured; a tripped gate is why a verdict is inconclusive."""
    if not report.gates:
        return None
    rows = [[g.name, g.concerns, _gate_value(g.name, g.observed), _gate_value(g.name, g.threshold), _count(g.n),
             f"[{100 * g.interval[0]:.1f}\u2013{100 * g.interval[1]:.1f}]" if g.interval else "",
             "TRIPPED" if g.tripped else "passed"] for g in report.gates]
    reasons = [f"{g.name}: {g.reason}" for g in report.gates if g.tripped and g.reason]
    return Section(
        "gates", "Evidence gates",
        paragraphs=["Each gate checks that the evidence can carry the verdict or that the defended model is sound; "
                    "a tripped gate makes the verdict inconclusive. Thresholds and the measurements behind them are "
                    "in bench/gates.md."],
        bullets=reasons,
        tables=[Table(["Gate", "Concerns", "Observed", "Threshold", "n", "95% interval", "Result"], rows,
                      align="llrrrrl")],
    )


#: Gates whose numbers are counts or image totals rather than shares.
_COUNT_GATES = ("probe_images",)


def _gate_value(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if name in _COUNT_GATES:
        return f"{value:,.0f}"
    return f"{100 * value:.1f}" + (" pts" if name in ("ba_drop", "evaluation_size") else "%")


def _plan(report: Report) -> Section | None:
    if report.plan is None:
        return None
    return Section("plan", "Audit plan",
                   paragraphs=["Every number the audit ran with, resolved from the spec, the effort level, the data "
                               "and the query budget before any work started."],
                   tables=[Table(["Item", "Value"], [list(row) for row in describe_plan(report.plan)], align="ll")])


def _mean_asr(controls: Sequence[PositiveControl]) -> str:
    before = sum(c.no_defense.asr for c in controls) / len(controls)
    after = sum(c.refine.asr for c in controls) / len(controls)
    return f"{change(before, after)} over {len(controls)} attack(s)"


def _controls(report: Report) -> Section | None:
    if not report.positive_controls:
        return None
    rows = [[c.attack, report.class_name(c.target), pct(c.poison_rate), change(c.no_defense.ba, c.refine.ba),
             change(c.no_defense.asr, c.refine.asr), change(c.no_defense.ra, c.refine.ra),
             _trained(c), f"{seconds(c.train_seconds)} + {seconds(c.refine_seconds)}", _origin(c)]
            for c in report.positive_controls]
    paragraphs = ["Backdoored reference models trained by this service on the same data, defended with the same "
                  f"REFINE configuration. Each cell reads no defense {ARROW} REFINE. ASR counts triggered test "
                  "images outside the target class that are classified as the target; RA counts those classified "
                  "as their true class."]
    plan = report.plan.controls if report.plan is not None else None
    if plan is not None and plan.stop_rule == "implanted":
        paragraphs.append(
            f"Each control trained until its backdoor implanted, at most {plan.epochs} epoch(s) ({plan.max_steps:,} "
            f"steps): checked every {plan.check_every} steps on {plan.holdout_images:,} held-out pool images, the rule "
            f"held once ASR reached {pct(plan.min_asr)} and BA was within {100 * plan.ba_tolerance:.0f} point(s) of "
            f"its best earlier check; it then trained {plan.cooldown_share:g} times as many steps again with the "
            "learning rate falling to zero, and stopped.")
    elif plan is not None and plan.attacks and plan.max_steps:  # plans before 2.2 did not record the steps
        paragraphs.append(f"Each control trained its whole schedule: {plan.epochs} epoch(s) over {plan.train_images:,} "
                          f"pool images ({plan.max_steps:,} steps), as a backdoored model is trained in earnest.")
    cached = [c for c in report.positive_controls if c.cache is not None]
    if cached:
        paragraphs.append("Controls are cached by everything they depend on (data, architecture, attack, training and "
                          "REFINE settings, seed, software version); a reused control is scored again on this audit's "
                          "test images. Cache keys: " + "; ".join(f"{c.attack} {c.cache.key}" for c in cached) + ".")
    return Section(
        "controls", "Positive controls", paragraphs=paragraphs,
        tables=[Table(["Attack", "Target", "Poisoned", "BA", "ASR", "RA", "Steps (held-out BA / ASR)",
                       "Time (train + REFINE)", "Model"], rows, align="llrrrrrrl")],
    )


def _trained(control: PositiveControl) -> str:
    """Steps trained of the cap, and what the held-out check read when training stopped."""
    t = control.training
    if t is None:
        return "—"
    held_out = f" ({pct(t.holdout_ba)} / {pct(t.holdout_asr)})" if t.holdout_ba is not None else ""
    return f"{t.steps:,} of {t.max_steps:,}{held_out}"


def _origin(control: PositiveControl) -> str:
    """trained, or reused with the audit that trained it (and whether REFINE was reused too)."""
    if control.origin == "trained" or control.cache is None:
        return "trained"
    refine = "REFINE reused" if control.cache.refine_origin == "reused" else "REFINE trained"
    by = f" from audit {control.cache.created_by}" if control.cache.created_by else ""
    return f"reused{by} ({control.cache.created_at[:10]}; {refine})"


def _utility(report: Report) -> Section | None:
    u, data = report.utility, report.inputs.data
    if u is None:
        return None
    tables = [Table(["Metric", "Submitted", "Defended", "Change"], [
        ["Benign accuracy (BA)", pct(u.ba_before), pct(u.ba_after), delta_pp(u.ba_before, u.ba_after)],
        ["Agreement with submitted model", "", pct(u.agreement), ""],
    ])]
    if data and u.per_class_accuracy_before and u.per_class_accuracy_after:
        rows = [[report.class_name(i), pct(b), pct(a), delta_pp(b, a)]
                for i, (b, a) in enumerate(zip(u.per_class_accuracy_before, u.per_class_accuracy_after))]
        tables.append(Table(["Class", "Submitted", "Defended", "Change"], rows, caption="Per-class accuracy"))
    paragraphs = [] if u.ba_before is not None else ["The test split has no labels, so only agreement is reported."]
    if data and u.confusion_after and data.num_classes > MAX_CONFUSION_CLASSES:
        paragraphs.append(f"The {data.num_classes}-class confusion matrix is in report.json (too wide to print).")
    elif data and u.confusion_after:
        header = ["true \\ predicted"] + [str(i) for i in range(data.num_classes)]
        rows = [[report.class_name(i)] + [str(n) for n in row] for i, row in enumerate(u.confusion_after)]
        tables.append(Table(header, rows, caption="Confusion matrix of the defended model (counts)"))
    return Section("utility", "Utility on clean data", paragraphs=paragraphs, tables=tables)


def _probes(report: Report) -> Section | None:
    if report.probes is None:
        return None
    before, after = report.probes.before, report.probes.after
    summary = Table(["", "Submitted", "Defended"], [
        ["Suspicion score", pct(before.score), pct(after.score)],
        ["Suspected target", report.class_name(before.suspected_target), report.class_name(after.suspected_target)],
        ["Images per probe", _count(before.images), _count(after.images)],
    ])
    return Section(
        "probes", "Trigger probes",
        paragraphs=[f"Each evidence cell reads submitted {ARROW} defended model. Flip rate: share of test "
                    "images whose prediction changed under the probe; concentration: share of those flips that "
                    "went to the top class."],
        tables=[summary, _evidence_table(report, before, after)],
    )


def _count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _evidence_table(report: Report, before: ProbeResult, after: ProbeResult) -> Table:
    """One row per probe, matching before and after by probe name (a probe missing on one side shows "-")."""
    by_name_before = {e.probe: e for e in before.evidence}
    by_name_after = {e.probe: e for e in after.evidence}
    names = list(dict.fromkeys([*by_name_before, *by_name_after]))
    rows = [_evidence_row(report, by_name_before.get(n), by_name_after.get(n)) for n in names]
    return Table(["Probe", "Family", "Flip rate", "Top class", "Concentration"], rows, caption="Evidence",
                 align="llrlr")


def _evidence_row(report: Report, b: ProbeEvidence | None, a: ProbeEvidence | None) -> list[str]:
    def both(fmt: Callable[[ProbeEvidence], str]) -> str:
        return f"{fmt(b) if b else '-'} {ARROW} {fmt(a) if a else '-'}"

    known = b or a
    assert known is not None  # every name comes from one of the two sides
    return [known.probe, known.family, both(lambda e: pct(e.flip_rate)),
            both(lambda e: report.class_name(e.top_class)), both(lambda e: pct(e.concentration))]


def _trigger_text(report: Report, d: Detection) -> str:
    """``class 1 Trouser, anomaly index 3.1; sends 95.0% [..], n = 300 held-out images there``."""
    state = "recovered" if d.recovered else "flagged, but too large or too weak" if d.flagged else "not flagged"
    if d.recovered and d.agrees_with_probes is False:
        state += ", toward another class than the probes' suspect"
    return (f"class {report.class_name(d.suspected_class)}, anomaly index {d.anomaly_index:.1f} ({state}); sends "
            f"{with_interval(d.success)} held-out images there")


def _detection(report: Report) -> Section | None:
    """Trigger reverse-engineering: the suspected class, how anomalous its mask is, and the trigger itself."""
    d = report.detection
    if d is None:
        return None
    summary = Table(["Item", "Value"], [
        ["Searched model", "the distilled surrogate (no API query)" if d.model == "surrogate" else "the submitted model"],
        ["Suspected target class", report.class_name(d.suspected_class)],
        ["Anomaly index", f"{d.anomaly_index:.2f} (flagged at {d.anomaly_threshold:.1f} with a mask at most "
                          f"{pct(d.max_norm_ratio)} of the median class's; here {pct(d.norm_ratio)}: "
                          f"{'flagged' if d.flagged else 'not flagged'})"],
        ["Recovered trigger's success", f"{with_interval(d.success)} held-out images of other classes"],
        ["Mask size", f"{pct(d.mask_fraction)} of the image (a trigger counts up to {pct(d.max_mask_fraction)})"],
        ["Probes suspect the same class", {True: "yes", False: "no (a clean model's universal patch looks like "
                                                              "this; it does not count)", None: "not recorded"}[
            d.agrees_with_probes]],
        ["Counts toward the verdict", "yes" if d.counts_toward_verdict else "no"],
        ["Search", f"{d.steps} steps per class on {d.images:,} clean images, {seconds(d.seconds)}"],
    ], align="ll")
    per_class = Table(["Class", "Mask L1 (pixels)", "Anomaly index", "Reached target"],
                      [[report.class_name(k), f"{norm:.1f}", f"{d.anomaly_indices[k]:.2f}",
                        ("yes" if d.reached[k] else "no") if d.reached else "n/a"]
                       for k, norm in enumerate(d.mask_norms)], caption="Per class", align="lrrl")
    paragraphs = [
        "For every class, a mask and a pattern were optimised so that stamping them on clean images sends the "
        "images to that class, with the mask kept as small as possible. A backdoor target needs a far smaller mask "
        "than any other class; the anomaly index counts robust standard deviations (MAD) below the median mask. "
        f"A trigger counts as recovered at an index of {d.anomaly_threshold:.0f} or more, with a mask at most "
        f"{pct(d.max_norm_ratio)} of the median class's and of at most {pct(d.max_mask_fraction)} of the image, "
        "and a success of "
        f"{pct(d.success_floor)} or more; recovered on the submitted model, it lifts a no-evidence reading to "
        "suspicious. The search cannot see triggers that are not a fixed stamp (warping or sample-specific triggers "
        "such as WaNet) or that are larger than a normal class's mask.",
    ]
    if d.model == "surrogate":
        paragraphs.append("The model was reached only through its API, so the search ran on the surrogate distilled "
                          "from its answers. A surrogate rarely inherits a backdoor from clean answers: this result "
                          "describes the surrogate, was not verified against the API and does not move the verdict.")
    tables = [summary, per_class]
    if d.label_only is not None:
        paragraphs.append(_label_only_text(report, d.label_only))
        tables.append(_label_only_table(report, d.label_only))
    figures = [ref for ref in report.images if ref.file in _detection_files(report)]
    return Section("detection", "Trigger reverse-engineering", paragraphs=paragraphs, tables=tables,
                   figures=figures)


def _detection_files(report: Report) -> set[str]:
    """The pictures the detection section shows: the recovered trigger and the label-only maps."""
    d = report.detection
    if d is None:
        return set()
    return {f for f in (d.image, d.label_only.image if d.label_only else None) if f is not None}


def _label_only_text(report: Report, lo: LabelOnlyDetection) -> str:
    """What the label-only search did on the API, what it found, and why it does not move the verdict."""
    return (f"Label-only detection on the API itself ({lo.method}, in the spirit of AEVA): for each class, "
            f"{lo.images_per_class} held-out image(s) of other classes were moved to the API's decision "
            f"boundary toward it, and the boundary's normal was estimated from the API's labels alone ({lo.rounds} "
            f"round(s) of {lo.directions} random directions) into a per-class map. A backdoor's target hinges on its "
            f"trigger's few pixels, so its map peaks. Highest peak: class {report.class_name(lo.suspected_class)}, "
            f"anomaly index {lo.anomaly_index:.2f}, from {lo.queries:,} API queries (at most {lo.query_cap:,}). "
            "On the project's model zoo this index did not tell backdoored from clean models apart (held-out "
            "ROC-AUC 0.55 at about 2,150 queries per model): it is reported as evidence to look at and does not move "
            "the verdict or the combined score.")


def _label_only_table(report: Report, lo: LabelOnlyDetection) -> Table:
    return Table(["Class", "Map peak", "Anomaly index", "Peak at (row, col)", "Images"],
                 [[report.class_name(k), f"{peak:.2f}", f"{lo.anomaly_indices[k]:.2f}",
                   f"({lo.peak_pixels[k][0]}, {lo.peak_pixels[k][1]})", str(lo.images[k])]
                  for k, peak in enumerate(lo.peaks)],
                 caption="Label-only detection on the API, per class (not calibrated)", align="lrrll")


def _blackbox(report: Report) -> Section | None:
    if report.queries is None and report.surrogate is None:
        return None
    tables = []
    if report.queries:
        q = report.queries
        tables.append(Table(["Queries", "Value"], [
            ["Images sent to the API", f"{q.queries_used:,}"],
            ["Budget", _count(q.budget)],
            ["HTTP requests", f"{q.requests:,}"],
            ["Cache hits", f"{q.cache_hits:,}"],
            ["Time spent querying", seconds(q.seconds)],
        ]))
    if report.surrogate:
        s = report.surrogate
        tables.append(Table(["Surrogate", "Value"], [
            ["Architecture", s.architecture],
            ["Agreement with API, clean images", pct(s.agreement_clean)],
            ["Agreement with API, probe-triggered images", pct(s.agreement_triggered)],
            ["Distillation epochs", str(len(s.history))],
        ]))
        if s.refits:
            tables.append(Table(["Refit after REFINE epoch", "Queries on T(x)", "Agreement before", "Agreement after"],
                                [[str(r.epoch), f"{r.queries:,}", pct(r.agreement_before), pct(r.agreement_after)]
                                 for r in s.refits]))
    return Section(
        "blackbox", "Black-box model and surrogate",
        paragraphs=["The model was reached only through its API. REFINE was trained through a surrogate distilled "
                    "from the API's answers; every number after the defense queries the real API through T and M."
                    + (" During REFINE the surrogate was refitted on the API's answers to transformed images, "
                       "where a surrogate distilled on natural images alone disagrees with the API."
                       if report.surrogate and report.surrogate.refits else "")],
        tables=tables,
    )


def _refine(report: Report) -> Section | None:
    r = report.refine
    if r is None:
        return None
    config = Table(["Setting", "Value"], [[k, _plain(v)] for k, v in r.config.items()], align="ll")
    mapping = Table(["f(T(x)) says", "defended model says"],
                    [[report.class_name(src), report.class_name(dst)] for src, dst in enumerate(r.mapping)],
                    caption="Output remapping M (a fixed derangement)", align="ll")
    tables = [config, mapping]
    if r.history:
        tables.append(Table(["Epoch", "Loss", "Classification", "SupCon", "LR", "Time"],
                            [[str(h.epoch), f"{h.loss:.4f}", f"{h.ce:.4f}", f"{h.supcon:.4f}", f"{h.lr:.2g}",
                              seconds(h.seconds)] for h in r.history], caption="Training history", align="rrrrrr"))
    if r.exports:
        tables.append(_exports_table(r.exports))
    return Section("refine", "REFINE defense",
                   paragraphs=[f"Input transformation T trained for {seconds(r.seconds)} without labels, "
                               "against the frozen model."],
                   tables=tables)


def _exports_table(exports: Sequence[DefenseExport]) -> Table:
    """Each deployable file of the defended model, and whether its reload agreed with the audited one."""
    def check(e: DefenseExport) -> str:
        if e.check is None:
            return e.error or "not checked"
        verdict = "agrees" if e.check.passed else "DIFFERS"
        return f"{verdict} on {e.check.agreement:.1%} of {e.check.images} images (max diff {e.check.max_abs_diff:.1e})"

    rows = [[e.name, e.format + (" (deprecated)" if e.deprecated else ""), check(e), e.sha256 or "—"] for e in exports]
    return Table(["File", "Format", "Reload check", "SHA-256"], rows, caption="Defended model files", align="llll")


def _plain(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _images(report: Report) -> Section | None:
    grids = [ref for ref in report.images if ref.file not in _detection_files(report)]  # shown under detection
    if not grids:
        return None
    return Section("images", "Sample images",
                   paragraphs=["Rows: clean test images, the same images with the attack's trigger, and what the "
                               "input transformation T makes of them. Images are upscaled without smoothing."],
                   figures=grids)


def _extra_plots(report: Report) -> Section | None:
    extra = [p for p in report.plots if p.file not in PLOT_SECTIONS]
    return Section("plots", "Additional plots", figures=extra) if extra else None


def _artifacts(report: Report) -> Section | None:
    if not report.artifacts:
        return None
    rows = [[a.name, a.kind, size(a.size), a.sha256] for a in report.artifacts]
    return Section("artifacts", "Artifacts", tables=[Table(["Name", "Kind", "Size", "SHA-256"], rows, align="llrl",
                                                           mono_column=3)])


def _provenance(report: Report) -> Section:
    s = report.software
    software = Table(["Software", "Version"], [
        ["refine-audit", s.refine_audit], ["torch", s.torch], ["torchvision", s.torchvision or "n/a"],
        ["python", s.python], ["device", s.device], ["seed", str(report.seed)],
    ], align="ll")
    tables = [software]
    if report.timings:
        rows = [[stage, seconds(t)] for stage, t in report.timings.stages.items()]
        tables.append(Table(["Stage", "Time"], rows + [["total", seconds(report.timings.total)]]))
    return Section("provenance", "Specification and software", tables=tables,
                   preformatted=json.dumps(report.spec, indent=2, sort_keys=True))


def _attach_plots(report: Report, sections: list[Section]) -> None:
    by_key = {s.key: s for s in sections}
    for plot in report.plots:
        section = by_key.get(PLOT_SECTIONS.get(plot.file, ""))
        if section is not None:
            section.figures.append(plot)
