"""The new-audit form: form fields in, an AuditSpec dict out; service errors back onto fields.

The form is only another way to write the spec the REST API takes. It builds the same
JSON a pipeline would POST and hands it to ``service.submit_audit``, so there is one
validator. Errors come back as ``detail.fields[].field`` paths of the spec
(``model.api.url``); ``field_errors`` maps each to the form control that produced it,
so the message appears next to the input the user has to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import FileStorage, ImmutableMultiDict

from auditor.attacks import ATTACKS, describe
from auditor.errors import AuditError, ErrorCode
from auditor.pipeline import DEFAULT_QUERY_BUDGET

EFFORTS: list[tuple[str, str]] = [
    ("tiny", "Smoke test (seconds) - checks the set-up, not the model"),
    ("quick", "Quick (minutes)"),
    ("standard", "Standard"),
    ("thorough", "Thorough (hours)"),
]
ARCHITECTURES: list[tuple[str, str]] = [
    ("", "From the checkpoint (TorchScript, or safetensors with metadata)"),
    ("small_cnn", "Small CNN"),
    ("resnet18", "ResNet-18"),
]
PROTOCOLS: list[tuple[str, str]] = [("v1", "KServe v1 (instances / predictions)"), ("v2", "Open Inference Protocol v2")]
OUTPUTS: list[tuple[str, str]] = [
    ("auto", "Detect"),
    ("probabilities", "Probabilities"),
    ("logits", "Logits"),
    ("labels", "Labels only"),
]
DEFAULT_ATTACKS = ("badnets", "blended")

#: Spec path prefix -> form control; the longest matching prefix wins.
FIELD_FOR_PATH: dict[str, str] = {
    "model": "model",
    "model.source": "model_source",
    "model.architecture": "architecture",
    "model.api": "api_url",
    "model.api.url": "api_url",
    "model.api.protocol": "api_protocol",
    "model.api.model_name": "api_model_name",
    "model.api.output": "api_output",
    "model.api.auth_header": "api_auth_header",
    "model.api.auth_value": "api_auth_value",
    "model.api.query_budget": "api_query_budget",
    "dataset": "dataset",
    "data": "data_source",
    "data.train_size": "train_size",
    "data.test_size": "test_size",
    "refine.epochs": "epochs",
    "controls.attacks": "attacks",
    "effort": "effort",
    "seed": "seed",
    "spec": "spec_override",
}
#: Codes that are about an uploaded file even when the error names no field.
FIELD_FOR_CODE: dict[ErrorCode, str] = {
    ErrorCode.INVALID_CHECKPOINT: "model",
    ErrorCode.INVALID_DATASET: "dataset",
    ErrorCode.UNSAFE_ARCHIVE: "dataset",
    ErrorCode.DATASET_TOO_LARGE: "dataset",
    ErrorCode.URL_NOT_ALLOWED: "api_url",
}
#: Where an error goes when nothing names a control: the advanced override may hold any path.
FALLBACK_FIELD = "spec_override"


def attack_choices() -> list[dict[str, Any]]:
    """Every positive-control attack the engine knows, with its one-line summary."""
    return [{**describe(name), "default": name in DEFAULT_ATTACKS} for name in ATTACKS]


@dataclass
class AuditForm:
    """What the user typed, kept to re-fill the form after an error (never the secret)."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def defaults(cls) -> AuditForm:
        return cls(
            values={
                "model_source": "checkpoint", "architecture": "", "api_protocol": "v1", "api_output": "auto",
                "api_model_name": "model", "api_query_budget": str(DEFAULT_QUERY_BUDGET), "data_source": "fashion-mnist",
                "effort": "quick", "attacks": list(DEFAULT_ATTACKS), "seed": "0",
            }
        )

    @classmethod
    def from_request(cls, form: ImmutableMultiDict[str, str]) -> AuditForm:
        values: dict[str, Any] = {k: v.strip() for k, v in form.items() if k not in ("csrf_token", "attacks")}
        values["attacks"] = form.getlist("attacks")
        values.pop("api_auth_value", None)  # a secret is never echoed back into a page
        return cls(values=values)


def build_spec(form: ImmutableMultiDict[str, str]) -> dict[str, Any]:
    """The AuditSpec JSON the form describes; the advanced JSON is merged on top of it."""
    def get(name: str) -> str:
        return (form.get(name) or "").strip()

    spec: dict[str, Any] = {"effort": get("effort") or "quick", "model": _model_part(get), "data": _data_part(get)}
    spec["controls"] = {"attacks": form.getlist("attacks")}
    _put_int(spec, ("refine", "epochs"), get("epochs"), "refine.epochs")
    _put_int(spec, ("seed",), get("seed"), "seed")
    return deep_merge(spec, _override(get("spec_override")))


def _model_part(get: Callable[[str], str]) -> dict[str, Any]:
    source = get("model_source") or "checkpoint"
    model: dict[str, Any] = {"source": source}
    if get("architecture"):
        model["architecture"] = {"name": get("architecture")}
    if source == "api":
        api: dict[str, Any] = {"url": get("api_url"), "protocol": get("api_protocol") or "v1"}
        for key in ("model_name", "output", "auth_header", "auth_value"):
            if get(f"api_{key}"):
                api[key] = get(f"api_{key}")
        holder = {"api": api}
        _put_int(holder, ("api", "query_budget"), get("api_query_budget"), "model.api.query_budget")
        model["api"] = holder["api"]
    return model


def _data_part(get: Callable[[str], str]) -> dict[str, Any]:
    data: dict[str, Any] = {"source": get("data_source") or "fashion-mnist"}
    _put_int(data, ("train_size",), get("train_size"), "data.train_size")
    _put_int(data, ("test_size",), get("test_size"), "data.test_size")
    return data


def _put_int(target: dict[str, Any], path: tuple[str, ...], raw: str, field_path: str) -> None:
    """Set an optional whole number; blank means "the effort level decides"."""
    if not raw:
        return
    try:
        value = int(raw)
    except ValueError:
        raise _spec_error(field_path, "must be a whole number") from None
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _override(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _spec_error("spec", f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise _spec_error("spec", "must be a JSON object, e.g. {\"refine\": {\"epochs\": 2}}")
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` wins; nested objects merge key by key, so an override can change one field."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _spec_error(field_path: str, message: str) -> AuditError:
    return AuditError(
        ErrorCode.INVALID_SPEC, f"{field_path}: {message}", {"fields": [{"field": field_path, "message": message}]}
    )


def field_errors(exc: AuditError) -> dict[str, str]:
    """Form control -> message for every field the error names (first message per control)."""
    named = [(f.get("field", ""), f.get("message", exc.message)) for f in exc.detail.get("fields", [])]
    if not named and isinstance(exc.detail.get("field"), str):
        named = [(exc.detail["field"], exc.message)]
    if not named:
        named = [("", exc.message)]
    errors: dict[str, str] = {}
    for path, message in named:
        errors.setdefault(control_for(path, exc.code), message)
    return errors


def control_for(path: str, code: ErrorCode) -> str:
    """The form control for a spec path such as ``model.api.url`` (longest known prefix)."""
    parts = path.split(".") if path else []
    for end in range(len(parts), 0, -1):
        found = FIELD_FOR_PATH.get(".".join(parts[:end]))
        if found:
            return found
    return FIELD_FOR_CODE.get(code, FALLBACK_FIELD)


def upload_files(files: ImmutableMultiDict[str, FileStorage], form: ImmutableMultiDict[str, str]) -> dict[str, FileStorage]:
    """The uploads that belong to the chosen sources (a hidden, stale file input is ignored)."""
    wanted = []
    if (form.get("model_source") or "checkpoint") == "checkpoint":
        wanted.append("model")
    if form.get("data_source") == "upload":
        wanted.append("dataset")
    return {name: f for name in wanted if (f := files.get(name)) is not None and f.filename}
