"""The audit specification: what a user asks for, validated and versioned.

One pydantic model serves the CLI, the REST API (its JSON Schema is the
OpenAPI request body) and the portal form, so a field means the same thing
everywhere. Every field has a default except the model, so a user only has to
name what to audit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from auditor.attacks import ATTACKS
from auditor.errors import AuditError, ErrorCode
from auditor.pipeline.plan import DEFAULT_QUERY_BUDGET
from auditor.registry.uri import PATH_PATTERN, URI_HELP, URI_PATTERN, check_artifact_path, parse_mlflow_uri

SPEC_VERSION = "1"
Effort = Literal["tiny", "quick", "standard", "thorough"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchitectureSpec(_Strict):
    """Needed for bare weights (safetensors without metadata, state dicts) and for surrogates."""

    name: Literal["small_cnn", "resnet18"] = "small_cnn"
    in_channels: Literal[1, 3] | None = Field(None, description="Defaults to the data's channels.")
    num_classes: int | None = Field(None, ge=2, le=1000, description="Defaults to the data's classes.")
    mean: list[float] | None = Field(None, description="Per-channel normalisation inside the model; defaults to the data's.")
    std: list[float] | None = None
    width: int = Field(32, ge=4, le=256)


class ApiSpec(_Strict):
    """A model behind an HTTP prediction API (black-box audit)."""

    url: HttpUrl
    protocol: Literal["v1", "v2", "json"] = "v1"
    model_name: str = Field("model", max_length=200)
    output: Literal["auto", "probabilities", "logits", "labels"] = "auto"
    auth_header: str | None = Field(None, max_length=100, description="Header name, e.g. Authorization.")
    auth_value: str | None = Field(None, max_length=4096, description="Secret header value; redacted in reports.", json_schema_extra={"writeOnly": True})
    query_budget: int = Field(DEFAULT_QUERY_BUDGET, ge=100, le=10_000_000,
                              description="Hard cap on images sent to the API; the plan splits it (auditor/pipeline/budget.py).")
    label_only_detection: bool = Field(
        False, description="Also search the API itself for a trigger with label-only queries (up to the effort's "
                            "share of the budget, taken from the surrogate's). Not yet calibrated: reported beside "
                            "the verdict, never in it.")
    batch_size: int = Field(64, ge=1, le=4096)
    max_concurrency: int = Field(4, ge=1, le=64)
    rate_limit_per_s: float | None = Field(None, gt=0)
    timeout_s: float = Field(30.0, gt=0, le=600)
    input_layout: Literal["nchw", "nhwc"] = "nchw"
    json_request_key: str = "instances"
    json_response_path: str = "predictions"

    def redacted(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if out.get("auth_value"):
            out["auth_value"] = "***"
        return out


class MlflowSpec(_Strict):
    """A checkpoint read from the operator's MLflow tracking server instead of an upload.

    The file is downloaded by the worker (never by the sandbox), checked like an upload and
    loaded only in the sandbox; results are written back to the model version (or run).
    """

    uri: str = Field(..., max_length=2000, description=f"{URI_HELP}, on the server REFINE_AUDIT_MLFLOW_TRACKING_URI names.",
                     json_schema_extra={"pattern": URI_PATTERN})
    path: str | None = Field(None, max_length=1000,
                             description="The checkpoint file inside those artifacts, e.g. data/model.safetensors; "
                                         "by default the one file with a checkpoint extension.",
                             json_schema_extra={"pattern": PATH_PATTERN})
    write_back: bool = Field(True, description="Tag the model version (or run) with the outcome and log the report "
                                               "files to its run under refine-audit/<audit id>/.")

    @field_validator("uri")
    @classmethod
    def _known_form(cls, uri: str) -> str:
        parse_mlflow_uri(uri)
        return uri

    @field_validator("path")
    @classmethod
    def _inside_artifacts(cls, path: str | None) -> str | None:
        return None if path is None else check_artifact_path(path)


class ModelSpec(_Strict):
    source: Literal["checkpoint", "api"] = Field(
        "checkpoint", description="checkpoint: an uploaded file, or one read from MLflow (model.mlflow); api: a prediction API.")
    architecture: ArchitectureSpec | None = Field(None, description="For bare weights; the surrogate's architecture for API models.")
    api: ApiSpec | None = None
    mlflow: MlflowSpec | None = Field(None, description="Read the checkpoint from MLflow instead of uploading it.")

    @model_validator(mode="after")
    def _api_needs_description(self) -> "ModelSpec":
        if self.source == "api" and self.api is None:
            raise ValueError("model.api is required when model.source is 'api'")
        if self.source == "checkpoint" and self.api is not None:
            raise ValueError("model.api is only for model.source 'api'")
        if self.source == "api" and self.mlflow is not None:
            raise ValueError("model.mlflow names a checkpoint; it is only for model.source 'checkpoint'")
        return self


class DataSpec(_Strict):
    source: Literal["fashion-mnist", "upload"] = "fashion-mnist"
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Uploaded data: share held out as the labelled test set.")
    test_size: int | None = Field(None, ge=20, description="Cap on test images used (all by default).")
    train_size: int | None = Field(None, ge=100, description="Cap on pool images for REFINE and positive controls.")


class RefineSpec(_Strict):
    epochs: int | None = Field(None, ge=1, le=500, description="Defaults from the effort level.")
    pool_size: int | None = Field(None, ge=64)
    unet_width: int | None = Field(None, ge=2, le=128)
    loss: Literal["kd", "bce", "ce"] = "kd"
    overlay: float | None = Field(None, ge=0.0, le=0.5, description="Blend T's training images with other pool "
                                  "images at weights up to this, so T learns to see through a faint full-image overlay "
                                  "(a Blended trigger's shape). Default 0 (off) at every effort level: it removes a "
                                  "Blended trigger better and a BATT one worse, for about 0.2 points of BA (README).")
    bf16: bool | None = Field(None, description="bf16 autocast; default on for CPUs with native bf16 (avx512_bf16 or AMX), where it is measured to help.")


class ControlsSpec(_Strict):
    attacks: list[str] = Field(default_factory=lambda: ["badnets", "blended"], max_length=8)
    train_epochs: int | None = Field(None, ge=1, le=200)
    target: int = Field(0, ge=0)
    stop_rule: Literal["fixed", "implanted"] = Field(
        "fixed", description="fixed: every epoch of the effort's schedule. implanted: stop once the backdoor holds on "
                             "a held-out split, then cool down: fewer steps (1,000-1,200 instead of 1,876 at standard), but "
                             "REFINE leaves more ASR on such controls (up to 11.4% measured), so the controls_removed "
                             "gate trips more often.")

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(ATTACKS))
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; known: {sorted(ATTACKS)}")
        return list(dict.fromkeys(names))


class ProbeSpec(_Strict):
    images: int | None = Field(None, ge=20, le=10_000, description="Test images per probe.")


class AuditSpec(_Strict):
    """Everything an audit needs besides the uploaded files."""

    version: Literal["1"] = SPEC_VERSION
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    effort: Effort = Field("standard", description="tiny (tests), quick, standard or thorough: sets epochs and data sizes.")
    refine: RefineSpec = Field(default_factory=RefineSpec)
    controls: ControlsSpec = Field(default_factory=ControlsSpec)
    probes: ProbeSpec = Field(default_factory=ProbeSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    callback_url: HttpUrl | None = Field(None, description="POSTed with a signed summary when the audit ends.")

    def redacted(self) -> dict[str, Any]:
        """The spec as stored in reports: secrets replaced."""
        out = self.model_dump(mode="json")
        if self.model.api is not None:
            out["model"]["api"] = self.model.api.redacted()
        return out


def parse_spec(raw: dict[str, Any] | None) -> AuditSpec:
    """Validate user input into an AuditSpec, or raise ``invalid_spec`` naming each field at fault."""
    from pydantic import ValidationError

    try:
        return AuditSpec.model_validate(raw or {})
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in err["loc"]) or "(root)", "message": err["msg"]} for err in exc.errors()]
        first = fields[0]
        raise AuditError(ErrorCode.INVALID_SPEC, f"{first['field']}: {first['message']}", {"fields": fields}) from None


def spec_json_schema() -> dict[str, Any]:
    return AuditSpec.model_json_schema()
