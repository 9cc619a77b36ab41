"""What ``run_audit`` takes and returns, and what its stages hand to each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from auditor.data import ImageSet
from auditor.pipeline.plan import AuditPlan
from auditor.settings import DEFAULT_FMNIST_DIR

#: (stage, metrics) for live detail such as the current REFINE epoch's loss
MetricsFn = Callable[[str, dict[str, Any]], None]


@dataclass
class AuditInputs:
    """The files and operator settings of one audit (the spec says everything else)."""

    work_dir: Path  # scratch space; the report and artifacts go to work_dir / "out"
    model_path: Path | None = None  # the uploaded checkpoint (checkpoint audits)
    dataset_path: Path | None = None  # an uploaded .npz or zip of class folders (data.source == "upload")
    allowed_hosts: tuple[str, ...] = ()  # SSRF allowlist for the model API (Settings.allowed_hosts)
    audit_id: str = "local"
    device: str = "auto"  # auto | cpu | cuda (Settings.device)
    fmnist_dir: Path = Path(DEFAULT_FMNIST_DIR)  # where the built-in data set lives (Settings.fmnist_dir)
    cache_dir: Path | None = None  # where its unpacked copy is kept (Settings.data_dir); None: ~/.cache/refine-audit
    control_cache: Path | None = None  # a folder of cached positive controls (auditor/pipeline/cache.py); None: train
    only_control: str | None = None  # run just this positive control into control_cache (a split audit's part)


@dataclass
class ArtifactFile:
    name: str  # stable file name, e.g. report.pdf, defended_model.pt
    path: Path
    kind: str  # report | model | plot | image | log | data
    content_type: str


@dataclass
class AuditResult:
    status: Literal["succeeded", "failed", "cancelled"]
    out_dir: Path
    report: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # small, for the DB row and list views
    artifacts: list[ArtifactFile] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"code", "message", "detail"}


@dataclass
class AuditState:
    """What the stages hand to each other; ``plan`` is set by the data stage and read by every later one."""

    spec: Any  # AuditSpec
    inputs: AuditInputs
    out: Path
    device: torch.device
    plan: AuditPlan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    pool: ImageSet | None = None
    test: ImageSet | None = None
    data_info: dict[str, Any] = field(default_factory=dict)
    labelled: bool = True  # the data came with labels (else the controls train on pseudo-labels: never cached)
    model_info: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the local model (checkpoint) or the surrogate (API)
    arch: Any = None  # ArchConfig: the architecture family of the positive controls (and the surrogate)
    api: Any = None  # HttpModelAPI for black-box audits
    distilled: Any = None  # SurrogateResult: what refits fine-tune (API audits)
    detection: Any = None  # TriggerSearchResult, from the detect stage
    refine: Any = None  # RefineResult
    sections: dict[str, Any] = field(default_factory=dict)  # report sections, by name
    findings: Any = None  # verdict.Findings, from the evaluate stage
    control_cache: Any = None  # cache.ControlCache over inputs.control_cache, opened by the first control
    grids: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    artifacts: list[ArtifactFile] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.data_info["num_classes"]

    def add_artifact(self, name: str, path: Path, kind: str, content_type: str) -> None:
        """Register a file once under a stable name (a later file of the same name replaces it)."""
        self.artifacts = [a for a in self.artifacts if a.name != name]
        self.artifacts.append(ArtifactFile(name, Path(path), kind, content_type))
