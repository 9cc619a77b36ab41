"""The OpenAPI document is valid 3.1, covers every route Flask serves, and describes
requests with the very models that validate them; /docs renders it without any
external asset."""

from __future__ import annotations

import re

from api_support import Api, api_factory, sqlite_api  # noqa: F401 (fixtures)
from openapi_spec_validator import validate

from auditor.errors import ErrorCode
from auditor.spec import AuditSpec
from web.errors import HTTP_STATUS

RULE_ARG = re.compile(r"<(?:\w+:)?(\w+)>")


def served_routes(api: Api) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every API rule the Flask app answers."""
    routes = set()
    for rule in api.app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/"):
            continue
        path = RULE_ARG.sub(r"{\1}", rule.rule.removeprefix("/api/v1"))
        routes |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_the_document_is_valid_openapi_31_and_covers_every_route(sqlite_api: Api) -> None:
    response = sqlite_api.client.get("/api/v1/openapi.json")

    document = response.get_json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert documented == served_routes(sqlite_api)
    assert ("post", "/audits") in documented and ("get", "/audits/{audit_id}/report.pdf") in documented


def test_the_spec_schema_is_the_one_the_api_validates_with(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    body = document["paths"]["/audits"]["post"]["requestBody"]["content"]

    assert set(schemas["AuditSpec"]["properties"]) == set(AuditSpec.model_json_schema()["properties"])
    # The body is the spec plus dry_run, in JSON and in the multipart spec part alike.
    assert set(schemas["AuditSubmission"]["properties"]) == {*AuditSpec.model_json_schema()["properties"], "dry_run"}
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/AuditSubmission"}
    assert body["multipart/form-data"]["schema"]["properties"]["spec"]["contentSchema"] == {
        "$ref": "#/components/schemas/AuditSubmission"
    }
    reply = document["paths"]["/audits"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {s["$ref"] for s in schemas[reply["$ref"].rsplit("/", 1)[1]]["anyOf"]} == {
        "#/components/schemas/AuditCreated", "#/components/schemas/PlanPreview"}
    assert "Idempotency-Key" in {p["name"] for p in document["paths"]["/audits"]["post"]["parameters"]}


def test_security_and_errors_are_described(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}

    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["paths"]["/health"]["get"]["security"] == []
    get_audit = document["paths"]["/audits/{audit_id}"]["get"]
    assert "security" not in get_audit  # inherits the global bearer requirement
    assert get_audit["responses"]["404"]["content"]["application/json"]["schema"] == envelope
    assert get_audit["responses"]["401"]["content"]["application/json"]["schema"] == envelope
    codes = document["components"]["schemas"]["ErrorCode"]["enum"]
    assert set(codes) == {code.value for code in ErrorCode}


def test_every_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)


def test_docs_page_lists_every_route_and_loads_nothing_external(sqlite_api: Api) -> None:
    response = sqlite_api.client.get("/api/v1/docs")
    html = response.get_data(as_text=True)

    assert response.status_code == 200 and response.mimetype == "text/html"
    for method, path in served_routes(sqlite_api):
        assert f"/api/v1{path}" in html, path
    assert 'id="schema-AuditSpec"' in html
    assert "<script" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
