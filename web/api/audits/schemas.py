"""Request and response shapes of the audits resource.

The request body is ``auditor.spec.AuditSpec`` itself (the same model the CLI and the
worker validate with); the models here describe what the API returns, built from the
database rows by the ``from_row`` constructors so views stay one line.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import url_for
from pydantic import BaseModel, Field, RootModel

from auditor.pipeline import AuditPlan
from auditor.pipeline.describe import describe_plan
from auditor.spec import AuditSpec
from auditor.store.lifecycle import AuditStatus
from auditor.store.models import Artifact, Audit, AuditEvent
from web.api.common import QueryModel
from web.inputs import PG_BIGINT_MAX

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
REPORT_FORMATS = ("json", "html", "pdf")
REPORT_MEDIA_TYPES = {"json": "application/json", "html": "text/html", "pdf": "application/pdf"}
#: Every content type artifacts are stored with, besides JSON (reports, the defense's
#: config): the uploaded inputs, models and weights, the PDF, plots and grids, the HTML
#: report and the audit log.
ARTIFACT_FILE_TYPES = ("application/octet-stream", "application/zip", "application/pdf", "image/png", "text/html", "text/plain")
SECRET_PLACEHOLDER = "***"


# --- requests ---------------------------------------------------------------------------


class AuditSubmission(AuditSpec):
    """The body of ``POST /audits`` (or its multipart ``spec`` part): an AuditSpec, plus ``dry_run``."""

    dry_run: bool = Field(
        False,
        description="Only plan the audit: answer 200 with the resolved plan and its time estimate after the same "
        "checks a submission gets (spec, uploads, URLs, query budget); nothing is stored or queued.",
    )


class ListQuery(QueryModel):
    status: Status | None = Field(None, description="Only audits in this status.")
    limit: int = Field(20, ge=1, le=100, description="Page size.")
    offset: int = Field(0, ge=0, le=PG_BIGINT_MAX, description="Audits to skip (newest first).")


class DownloadQuery(QueryModel):
    redirect: bool = Field(False, description="Answer 302 to a short-lived presigned URL when the store has them.")


# --- responses --------------------------------------------------------------------------


class AuditLinks(BaseModel):
    self: str
    cancel: str
    events: str
    artifacts: str
    report_json: str
    report_html: str
    report_pdf: str

    @classmethod
    def for_audit(cls, audit_id: str) -> AuditLinks:
        def link(endpoint: str) -> str:
            return url_for(f"api.audits.{endpoint}", audit_id=audit_id)

        return cls(
            self=link("get_audit"),
            cancel=link("cancel_audit"),
            events=link("list_events"),
            artifacts=link("list_artifacts"),
            **{f"report_{fmt}": link(f"report_{fmt}") for fmt in REPORT_FORMATS},
        )


class AuditCreated(BaseModel):
    id: str
    status: Status
    links: AuditLinks

    @classmethod
    def from_row(cls, audit: Audit) -> AuditCreated:
        return cls(id=audit.id, status=AuditStatus(audit.status).value, links=AuditLinks.for_audit(audit.id))


class PlanPreview(BaseModel):
    """What a dry run answers: the plan the worker would run, and how long it should take."""

    dry_run: Literal[True] = True
    plan: AuditPlan = Field(description="Every number of the audit, as report.json's plan section will hold it.")
    estimated_seconds: float = Field(ge=0, description="Sum of the plan's per-stage estimates, one CPU core.")
    description: list[tuple[str, str]] = Field(description="The plan in words: (item, value) rows.")

    @classmethod
    def from_plan(cls, plan: AuditPlan) -> PlanPreview:
        return cls(plan=plan, estimated_seconds=plan.total_seconds, description=describe_plan(plan))


class SubmitReply(RootModel[AuditCreated | PlanPreview]):
    """200: the audit an earlier request with the same Idempotency-Key created, or a dry run's plan."""


class AuditFailure(BaseModel):
    code: str = Field(description="An ErrorCode value, e.g. invalid_checkpoint or worker_lost.")
    message: str


class AuditItem(BaseModel):
    """An audit as lists show it."""

    id: str
    status: Status
    stage: str | None = Field(description="The stage running now (or last run).")
    progress: float = Field(ge=0, le=1, description="Overall progress, 0 to 1.")
    summary: dict[str, Any] | None = Field(description="Headline numbers once the audit has ended.")
    error: AuditFailure | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: AuditLinks

    @classmethod
    def fields_from_row(cls, audit: Audit) -> dict[str, Any]:
        error = AuditFailure(code=audit.error_code, message=audit.error_message or "") if audit.error_code else None
        return dict(
            id=audit.id,
            status=AuditStatus(audit.status).value,
            stage=audit.stage,
            progress=audit.progress,
            summary=audit.summary,
            error=error,
            cancel_requested=audit.cancel_requested,
            created_at=audit.created_at,
            started_at=audit.started_at,
            finished_at=audit.finished_at,
            updated_at=audit.updated_at,
            links=AuditLinks.for_audit(audit.id),
        )

    @classmethod
    def from_row(cls, audit: Audit) -> AuditItem:
        return cls(**cls.fields_from_row(audit))


class AuditDetail(AuditItem):
    """One audit with everything the row holds (secrets in the spec replaced by ***)."""

    stage_detail: dict[str, Any] = Field(description="Live detail of the stage, e.g. the REFINE epoch and loss.")
    spec: dict[str, Any] = Field(description="The submitted AuditSpec, with secrets redacted.")
    seed: int
    queue: str
    attempts: int
    software: dict[str, Any]

    @classmethod
    def from_row(cls, audit: Audit) -> AuditDetail:
        return cls(
            **cls.fields_from_row(audit),
            stage_detail=audit.stage_detail or {},
            spec=redact_spec(audit.spec),
            seed=audit.seed,
            queue=audit.queue,
            attempts=audit.attempts,
            software=audit.software or {},
        )


class AuditPage(BaseModel):
    items: list[AuditItem]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str = Field(description="status, stage, cancel_requested, warning, ...")
    stage: str | None
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: AuditEvent) -> EventOut:
        return cls(id=event.id, at=event.at, kind=event.kind, stage=event.stage, message=event.message, data=event.data)


class EventList(BaseModel):
    items: list[EventOut]


class ArtifactLinks(BaseModel):
    download: str


class ArtifactOut(BaseModel):
    name: str
    kind: str = Field(description="input, report, defended_model, transform, surrogate, image, log, ...")
    content_type: str
    size: int
    sha256: str
    created_at: datetime
    links: ArtifactLinks

    @classmethod
    def from_row(cls, artifact: Artifact) -> ArtifactOut:
        download = url_for("api.audits.download_artifact", audit_id=artifact.audit_id, name=artifact.name)
        return cls(
            name=artifact.name,
            kind=artifact.kind,
            content_type=artifact.content_type,
            size=artifact.size,
            sha256=artifact.sha256,
            created_at=artifact.created_at,
            links=ArtifactLinks(download=download),
        )


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The stored spec keeps the model API's secret for the worker; the API never shows it."""
    api = (spec.get("model") or {}).get("api")
    if not isinstance(api, dict) or not api.get("auth_value"):
        return spec
    return {**spec, "model": {**spec["model"], "api": {**api, "auth_value": SECRET_PLACEHOLDER}}}
