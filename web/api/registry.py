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
class Link:
    """An OpenAPI link: how a value in this response fills a parameter of another operation,
    e.g. the id a submission returns is the ``audit_id`` of ``audits.get_audit``."""

    operation: str  # the target's endpoint, which is its operationId
    parameters: dict[str, str]  # parameter name -> runtime expression, e.g. $response.body#/id


@dataclass(frozen=True)
class Reply:
    """One documented response: a JSON model or schema, streamed files of some media types, or nothing."""

    description: str
    model: type[BaseModel] | None = None
    files: tuple[str, ...] = ()  # media types of streamed files, e.g. ("application/pdf",)
    json_schema: dict[str, Any] | None = None  # JSON described without a pydantic model
    headers: dict[str, str] = field(default_factory=dict)  # header name -> description
    links: tuple[Link, ...] = ()


@dataclass(frozen=True)
class Header:
    """A request header an operation reads."""

    description: str
    max_length: int | None = None


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
    headers: dict[str, Header] = field(default_factory=dict)


API_PREFIX = "/api/v1"
#: Any operation refuses a path value or header the database could not store (``web.inputs``).
UNSTORABLE_INPUT_STATUS = 422
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
    headers: dict[str, Header] | None = None,
    endpoint: str | None = None,
) -> Callable[[View], View]:
    """Register ``view`` under ``rule`` (bearer auth unless ``auth=False``) and document it."""

    def decorate(view: View) -> View:
        name = endpoint or view.__name__
        guarded = require_token(view) if auth else view
        blueprint.add_url_rule(rule, endpoint=name, view_func=guarded, methods=[method])
        statuses = (*errors, UNSTORABLE_INPUT_STATUS, *((401,) if auth else ()))
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
