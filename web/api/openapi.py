"""The OpenAPI 3.1 document and a self-contained HTML reference, both built from the
route registry and the same pydantic models that validate requests.

``/docs`` is rendered on the server from the document (no JavaScript, no CDN): the
service often runs where there is no internet, and a reference page must still work.
"""

from __future__ import annotations

import copy
import functools
import re
from http import HTTPStatus
from importlib import metadata
from typing import Any

from flask import Blueprint, Response, jsonify, render_template
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from auditor.spec import AuditSpec
from web.api.common import ErrorEnvelope
from web.api.registry import API_PREFIX, OPERATIONS, Body, Operation, Reply, operation
from web.inputs import PG_INTEGER_MAX

REF_TEMPLATE = "#/components/schemas/{model}"
BEARER = "bearerAuth"
_RULE_ARG = re.compile(r"<(?:(\w+):)?(\w+)>")
#: Path converters: integer path values are row ids (PostgreSQL ``integer``, never negative).
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {"int": {"type": "integer", "minimum": 0, "maximum": PG_INTEGER_MAX}}
#: What ``web.inputs`` enforces on every text a client sends: no NUL character.
NUL_FREE_PATTERN = "^[^\\x00]*$"
#: Strings that already say what they hold (an enum, a URL, a file's bytes) are left as they are.
_CONSTRAINED_STRING_KEYS = frozenset({"enum", "const", "format", "pattern", "contentMediaType"})
#: The served document's shape, for clients and response validators.
OPENAPI_DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An OpenAPI 3.1 document.",
    "required": ["openapi", "info", "paths", "components"],
    "properties": {
        "openapi": {"type": "string", "pattern": "^3\\.1\\.[0-9]+$"},
        "info": {"type": "object", "required": ["title", "version"]},
        "paths": {"type": "object"},
        "components": {"type": "object"},
    },
}

bp = Blueprint("docs", __name__, template_folder="templates")


@operation(bp, "GET", "/openapi.json", summary="This API's OpenAPI 3.1 document", auth=False,
           replies={200: Reply("The document.", json_schema=OPENAPI_DOCUMENT_SCHEMA)})
def openapi_json() -> Response:
    return jsonify(openapi_document())


@operation(bp, "GET", "/docs", summary="A readable reference of every route and schema", auth=False,
           replies={200: Reply("An HTML page without external assets.", files=("text/html",))})
def docs() -> str:
    document = openapi_document()
    return render_template("api/docs.html", doc=document, routes=_routes_for_page(document),
                           schemas=_schemas_for_page(document), type_label=type_label)


# --- the document -------------------------------------------------------------------------


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Built once per process: the registry is complete once the blueprints are imported."""
    refs, top = models_json_schema(_models(), ref_template=REF_TEMPLATE)
    schemas = top.get("$defs", {})
    builder = _OperationBuilder({key: value["$ref"] for key, value in refs.items()}, schemas)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(openapi_path(op.rule), {})[op.method] = builder.operation(op)
    _declare_nul_free_requests(paths, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "refine-audit API",
            "version": _version(),
            "description": "Submit image classifiers for a backdoor audit with REFINE, follow progress, "
            "and download reports and the defended model. Authenticate with `Authorization: Bearer ra_...`.",
        },
        "servers": [{"url": API_PREFIX}],
        "security": [{BEARER: []}],
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer", "bearerFormat": "ra_<random>"}},
        },
    }


def openapi_path(rule: str) -> str:
    """``/audits/<audit_id>/artifacts/<path:name>`` -> ``/audits/{audit_id}/artifacts/{name}``."""
    return _RULE_ARG.sub(lambda m: "{" + m.group(2) + "}", rule)


def _version() -> str:
    try:
        return metadata.version("refine-audit")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every model the document names: request bodies validate, replies serialize."""
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (AuditSpec, "validation"): None,
        (ErrorEnvelope, "serialization"): None,
    }
    for op in OPERATIONS:
        for model in _body_models(op.body):
            found[(model, "validation")] = None
        for reply_ in op.replies.values():
            if reply_.model is not None:
                found[(reply_.model, "serialization")] = None
    return list(found)


def _body_models(body: Body | None) -> list[type[BaseModel]]:
    if body is None:
        return []
    return [m for m in body.content.values() if isinstance(m, type) and issubclass(m, BaseModel)]


class _OperationBuilder:
    """Turns registry entries into OpenAPI operation objects, given where each model lives;
    the definitions of raw JSON schemas (a reply's ``$defs``) join ``schemas``."""

    def __init__(self, refs: dict[tuple[type[BaseModel], JsonSchemaMode], str], schemas: dict[str, Any]):
        self.refs = refs
        self.schemas = schemas

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, str]:
        return {"$ref": self.refs[(model, mode)]}

    def operation(self, op: Operation) -> dict[str, Any]:
        out: dict[str, Any] = {
            "operationId": op.endpoint,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": _path_parameters(op.rule) + _query_parameters(op) + _header_parameters(op),
            "responses": self.responses(op),
        }
        if op.description:
            out["description"] = op.description
        if not op.auth:
            out["security"] = []
        if op.body is not None:
            out["requestBody"] = self.request_body(op.body)
        return out

    def request_body(self, body: Body) -> dict[str, Any]:
        content = {
            media_type: {"schema": copy.deepcopy(schema) if isinstance(schema, dict) else self.ref(schema, "validation")}
            for media_type, schema in body.content.items()
        }
        out: dict[str, Any] = {"required": True, "content": content}
        if body.description:
            out["description"] = body.description
        return out

    def responses(self, op: Operation) -> dict[str, Any]:
        responses = {str(status): self.reply(reply_) for status, reply_ in sorted(op.replies.items())}
        for status in op.errors:
            responses.setdefault(str(status), {
                "description": HTTPStatus(status).phrase,
                "content": {"application/json": {"schema": self.ref(ErrorEnvelope, "serialization")}},
            })
        return responses

    def reply(self, reply_: Reply) -> dict[str, Any]:
        out: dict[str, Any] = {"description": reply_.description}
        content: dict[str, Any] = {}
        if reply_.model is not None:
            content["application/json"] = {"schema": self.ref(reply_.model, "serialization")}
        elif reply_.json_schema is not None:
            content["application/json"] = {"schema": self.lift_defs(reply_.json_schema)}
        for media_type in reply_.files:
            content[media_type] = {"schema": {"type": "string", "contentMediaType": media_type}}
        if content:
            out["content"] = content
        if reply_.headers:
            out["headers"] = {n: {"description": t, "schema": {"type": "string"}} for n, t in reply_.headers.items()}
        if reply_.links:
            out["links"] = {
                link.operation.rsplit(".", 1)[-1]: {"operationId": link.operation, "parameters": link.parameters}
                for link in reply_.links
            }
        return out

    def lift_defs(self, schema: dict[str, Any]) -> dict[str, Any]:
        """A standalone JSON Schema (e.g. ``docs/report.schema.json``) inside the document: its
        ``$defs`` become components and its refs point there; ``$id`` would re-base them, so it goes."""
        schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
        for name, definition in schema.pop("$defs", {}).items():
            if self.schemas.setdefault(name, _rebase_refs(definition)) != _rebase_refs(definition):
                raise ValueError(f"two different schemas are both named {name!r}")
        return _rebase_refs(schema)


def _rebase_refs(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: (v.replace("#/$defs/", "#/components/schemas/", 1) if k == "$ref" else _rebase_refs(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase_refs(item) for item in schema]
    return schema


def _declare_nul_free_requests(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """State on every free-text string a client sends (parameters, request bodies and the
    components they use) the rule ``web.inputs`` enforces, so generated clients and fuzzers
    know a NUL character is refused."""
    for operation_ in (op for methods in paths.values() for op in methods.values()):
        for parameter in operation_["parameters"]:
            _nul_free(parameter["schema"])
        for media in operation_.get("requestBody", {}).get("content", {}).values():
            _nul_free(media["schema"])
    for name in _components_used_by_requests(paths, schemas):
        _nul_free(schemas[name])


def _components_used_by_requests(paths: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    pending = [op.get("requestBody", {}) for methods in paths.values() for op in methods.values()]
    found: set[str] = set()
    while pending:
        for ref in _refs_in(pending.pop()):
            name = ref.rsplit("/", 1)[-1]
            if name not in found:
                found.add(name)
                pending.append(schemas[name])
    return found


def _refs_in(schema: Any) -> list[str]:
    if isinstance(schema, dict):
        own = [schema["$ref"]] if isinstance(schema.get("$ref"), str) else []
        return own + [ref for value in schema.values() for ref in _refs_in(value)]
    if isinstance(schema, list):
        return [ref for item in schema for ref in _refs_in(item)]
    return []


def _nul_free(schema: Any) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "string" and not _CONSTRAINED_STRING_KEYS & schema.keys():
            schema["pattern"] = NUL_FREE_PATTERN
        for value in schema.values():
            _nul_free(value)
    elif isinstance(schema, list):
        for item in schema:
            _nul_free(item)


def _path_parameters(rule: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": dict(_CONVERTER_SCHEMAS.get(conv, {"type": "string"}))}
        for conv, name in _RULE_ARG.findall(rule)
    ]


def _query_parameters(op: Operation) -> list[dict[str, Any]]:
    if op.query is None:
        return []
    schema = op.query.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _header_parameters(op: Operation) -> list[dict[str, Any]]:
    params = []
    for name, header in op.headers.items():
        schema: dict[str, Any] = {"type": "string"}
        if header.max_length is not None:
            schema.update(minLength=1, maxLength=header.max_length)
        params.append({"name": name, "in": "header", "required": False, "description": header.description, "schema": schema})
    return params


# --- the HTML page ------------------------------------------------------------------------


def _routes_for_page(document: dict[str, Any]) -> list[dict[str, Any]]:
    routes = []
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            routes.append({"method": method.upper(), "path": API_PREFIX + path, "op": op,
                           "anchor": op["operationId"].replace(".", "-")})
    return routes


def _schemas_for_page(document: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, schema in sorted(document["components"]["schemas"].items()):
        required = set(schema.get("required", []))
        fields = [
            {"name": field, "type": type_label(prop), "required": field in required,
             "default": prop.get("default"), "description": prop.get("description", "")}
            for field, prop in schema.get("properties", {}).items()
        ]
        out.append({"name": name, "description": schema.get("description", ""), "fields": fields,
                    "enum": schema.get("enum")})
    return out


def type_label(schema: dict[str, Any]) -> str:
    """A short human reading of a JSON Schema: ``list[AuditItem]``, ``"a" | "b"``, ``integer | null``."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "enum" in schema:
        return " | ".join(repr(v) if isinstance(v, str) else str(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return " | ".join(type_label(s) for s in schema[key])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{type_label(schema.get('items', {}))}]"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"map[string, {type_label(schema['additionalProperties'])}]"
    return kind if isinstance(kind, str) else " | ".join(kind)
