"""Helpers every resource uses: JSON replies from pydantic models, query parsing and
the shared error-envelope schema."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from auditor.errors import AuditError, ErrorCode

M = TypeVar("M", bound=BaseModel)


class ErrorBody(BaseModel):
    code: ErrorCode = Field(description="Stable machine-readable code; the contract.")
    message: str = Field(description="For people; may change between versions.")
    detail: dict[str, Any] = Field(default_factory=dict, description="Structured context, e.g. fields at fault.")


class ErrorEnvelope(BaseModel):
    """Every error the API returns, whatever the status."""

    error: ErrorBody


class QueryModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(model.model_dump(mode="json"))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def parse_query(model: type[M]) -> M:
    """Validate the query string against ``model``; ``invalid_request`` names each bad parameter."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise invalid_request(exc, "Bad query parameter ") from None


def parse_json_body(model: type[M]) -> M:
    """Validate a JSON body against ``model``; ``invalid_request`` names each bad field.

    ``request.get_json`` (``web.inputs.CheckedRequest``) has already answered a body that
    is not JSON (415), not valid JSON or not storable (422).
    """
    body = request.get_json()
    if not isinstance(body, dict):
        raise AuditError(ErrorCode.INVALID_REQUEST, "The body must be a JSON object.",
                         {"fields": [{"field": "(root)", "message": "must be a JSON object"}]})
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc) from None


def invalid_request(exc: ValidationError, prefix: str = "") -> AuditError:
    """``invalid_request`` with ``detail.fields`` naming every field at fault."""
    fields = [{"field": ".".join(str(p) for p in e["loc"]) or "(root)", "message": e["msg"]} for e in exc.errors()]
    first = fields[0]
    return AuditError(ErrorCode.INVALID_REQUEST, f"{prefix}{first['field']}: {first['message']}", {"fields": fields})
