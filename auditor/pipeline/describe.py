"""The plan in plain words: the rows ``refine-audit audit --plan``, the REST dry run, the portal's form and the report show."""

from __future__ import annotations

from auditor.pipeline.plan import AuditPlan, ControlsPlan


def describe_plan(plan: AuditPlan) -> list[tuple[str, str]]:
    """The plan as (item, value) rows in plain words: what ``--plan`` prints and the portal's form shows."""
    d, r, p, c, t = plan.data, plan.refine, plan.probes, plan.controls, plan.detection
    rows = [
        ("Effort", f"{plan.effort} ({plan.source} audit on {plan.device}{', bf16' if plan.bf16 else ''})"),
        ("Data", f"{d.pool_images:,} pool images, {d.test_images:,} of {d.test_available:,} test images"
                 f"{' (stratified)' if d.stratified else ''}; {d.num_classes} classes, {'x'.join(map(str, d.image_shape))}"),
        ("REFINE", f"{_count(r.epochs, 'epoch')} over {r.pool_images:,} images, U-Net width {r.unet_width}, "
                   f"batch {r.batch_size}, {r.loss} loss"
                   f"{f', inputs overlaid up to {r.overlay:g}' if r.overlay else ''}"),
        ("Probes", f"{p.probes} probes ({p.battery} battery) on {p.images} images; the defended model: {p.after_probes}"),
        *([("Trigger search", f"{_count(t.steps, 'step')} per class on {t.images:,} clean images (batch "
                               f"{t.batch_size}) of the {t.model} model; success measured on up to "
                               f"{t.holdout_images:,} held-out images")] if t is not None else []),
        ("Positive controls", ", ".join(c.attacks) + f": {_count(c.epochs, 'epoch')} on {c.train_images:,} images"
         + _implant_rule(c) if c.attacks else "none"),
    ]
    if plan.surrogate is not None and plan.queries is not None:
        s, q = plan.surrogate, plan.queries
        rows.append(("Surrogate", f"{s.architecture}, {_count(s.distill_epochs, 'epoch')} on {s.distill_queries:,} "
                                  f"API answers; {_count(s.refit_rounds, 'refit')} on {s.refit_queries:,} transformed images"))
        rows.append(("Queries", f"{q.budget:,}: distillation {q.distillation:,}, refits {q.refits:,}, evaluation "
                                f"{q.evaluation:,}, probes {q.probes:,}, label-only detection {q.detection:,}, "
                                f"unused {q.unallocated:,}"))
    if plan.label_only is not None:
        lo = plan.label_only
        rows.append(("Label-only detection", f"{lo.images_per_class} image(s) per class, {_count(lo.rounds, 'round')} "
                                             f"of {lo.directions} directions, at most {lo.queries:,} API queries; "
                                             "not calibrated, does not move the verdict"))
    stages = ", ".join(f"{stage} {_duration(s)}" for stage, s in plan.estimate_seconds.items())
    rows.append(("Estimated time", f"{_duration(plan.total_seconds)} on one CPU core ({stages})"))
    rows += [("Note", note) for note in plan.notes]
    return rows


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _implant_rule(c: ControlsPlan) -> str:
    if c.stop_rule != "implanted":
        return ""
    return (f" at most; stop when held-out ASR >= {100 * c.min_asr:.0f}% and BA is within {100 * c.ba_tolerance:.0f} "
            f"point(s) of its best (checked every {c.check_every} steps on {c.holdout_images:,} held-out images), "
            f"after a cool-down of {c.cooldown_share:g}x the steps taken")
