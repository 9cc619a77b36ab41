"""The audit pipeline: ``run_audit(spec, inputs, on_progress, should_cancel, on_metrics) -> AuditResult``.

A map for a first read, in the order an audit runs:

    plan.py       effort presets, defaults, the stage list, and plan_audit(): every number, resolved once
    describe.py   the plan in words (what --plan, the dry run, the portal and the report show)
    budget.py     how an API audit's query budget is split (and refused when too small)
    estimate.py   seconds per stage, from rates measured by the benchmarks
    data.py       stage data: read the images, resolve the plan, cut pool and test sets
    load.py       stage load: the checkpoint, or the model API
    surrogate.py  stage surrogate (API audits): distil the local stand-in REFINE trains through
    detect.py     stage detect: reverse-engineer a trigger per class (auditor/detection/), flag the outlier
    refine.py     stage refine: train T and fix M; save the defense
    evaluate.py   stage evaluate: utility, probes, positive controls (controls.py)
    cache.py      positive controls reused, not retrained: keys, entries verified by sha256 (store side: auditor/store/control_cache.py)
    verdict.py    evidence gates and verdict rules
    report.py     the report dict, its files and the row summary
    run.py        run_audit: the stages in order, timing, logging, failures; run_control_part: one control alone
    state.py      what run_audit takes and returns, and what stages hand each other

The plan's names load eagerly (they import no stage, so ``auditor.spec`` and the
model-API client can read the defaults); ``run_audit`` and its dataclasses load on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from auditor.pipeline.plan import (
    DEFAULT_QUERY_BUDGET,
    EFFORTS,
    FASHION_MNIST,
    STAGES,
    AuditPlan,
    DataSummary,
    plan_audit,
    upload_summary,
)

if TYPE_CHECKING:
    from auditor.pipeline.run import run_audit
    from auditor.pipeline.state import ArtifactFile, AuditInputs, AuditResult, MetricsFn

_LAZY = {
    "run_audit": "auditor.pipeline.run",
    "AuditInputs": "auditor.pipeline.state",
    "AuditResult": "auditor.pipeline.state",
    "ArtifactFile": "auditor.pipeline.state",
    "MetricsFn": "auditor.pipeline.state",
}

__all__ = [
    "DEFAULT_QUERY_BUDGET",
    "EFFORTS",
    "FASHION_MNIST",
    "STAGES",
    "ArtifactFile",
    "AuditInputs",
    "AuditPlan",
    "AuditResult",
    "DataSummary",
    "MetricsFn",
    "plan_audit",
    "run_audit",
    "upload_summary",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'auditor.pipeline' has no attribute {name!r}")
