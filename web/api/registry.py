"""Routes declared once, for both Flask and the OpenAPI document.

``operation`` registers a view on a blueprint *and* records what the OpenAPI document
needs (summary, query and body models, responses, error statuses). Because the same
pydantic models validate the requests and describe them, the document cannot drift
from the code; a test checks that every API rule Flask serves is in the document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Blueprint
from pydantic import BaseModel

from web.auth import require_token

View = Callable[..., Any]


@dataclass(frozen=True)
class Reply:
    """One documented response: a JSON model, raw bytes of a media type, or nothing."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str | None = None  # e.g. application/pdf for streamed files
    headers: dict[str, str] = field(default_factory=dict)  # header name -> description


@dataclass(frozen=True)
class Body:
    """A request body: per media type, a pydantic model or a raw JSON Schema."""

    content: dict[str, type[BaseModel] | dict[str, Any]]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    method: str
    rule: str  # the Flask rule relative to the API prefix, e.g. /audits/<audit_id>
    endpoint: str  # unique per operation: <resource>.<view>, e.g. audits.get_audit
    summary: str
    tag: str
    auth: bool
    description: str = ""
    query: type[BaseModel] | None = None
    body: Body | None = None
    replies: dict[int, Reply] = field(default_factory=dict)
    errors: tuple[int, ...] = ()  # statuses answered with the error envelope
    headers: dict[str, str] = field(default_factory=dict)  # request header name -> description


API_PREFIX = "/api/v1"
OPERATIONS: list[Operation] = []


def operation(
    blueprint: Blueprint,
    method: str,
    rule: str,
    *,
    summary: str,
    replies: dict[int, Reply],
    auth: bool = True,
    query: type[BaseModel] | None = None,
    body: Body | None = None,
    errors: tuple[int, ...] = (),
    headers: dict[str, str] | None = None,
    endpoint: str | None = None,
) -> Callable[[View], View]:
    """Register ``view`` under ``rule`` (bearer auth unless ``auth=False``) and document it."""

    def decorate(view: View) -> View:
        name = endpoint or view.__name__
        guarded = require_token(view) if auth else view
        blueprint.add_url_rule(rule, endpoint=name, view_func=guarded, methods=[method])
        statuses = (*errors, 401) if auth else errors
        OPERATIONS.append(
            Operation(
                method=method.lower(),
                rule=(blueprint.url_prefix or "") + rule,
                endpoint=f"{blueprint.name}.{name}",
                summary=summary,
                tag=blueprint.name,
                auth=auth,
                description=(view.__doc__ or "").strip(),
                query=query,
                body=body,
                replies=replies,
                errors=tuple(sorted(set(statuses))),
                headers=headers or {},
            )
        )
        return view

    return decorate
