"""The OpenAPI document is valid 3.1, covers every route Flask serves, describes
requests with the very models that validate them and replies as they are served
(JSON with its schema, files with their types), states the input rules the API
enforces, and links operations; /docs renders it without any external asset."""

from __future__ import annotations

import re

import jsonschema
from api_support import Api, api_factory, sqlite_api  # noqa: F401 (fixtures)
from openapi_spec_validator import validate

from auditor.errors import ErrorCode
from auditor.report.schema import report_json_schema
from auditor.spec import AuditSpec
from web.api.audits.schemas import ARTIFACT_FILE_TYPES
from web.api.audits.service import MAX_IDEMPOTENCY_KEY_LENGTH
from web.api.openapi import NUL_FREE_PATTERN
from web.errors import HTTP_STATUS
from web.inputs import PG_BIGINT_MAX, PG_INTEGER_MAX

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


def test_json_responses_are_described_as_json_with_their_schemas(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    report = paths["/audits/{audit_id}/report.json"]["get"]["responses"]["200"]["content"]
    itself = paths["/openapi.json"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]

    assert set(report) == {"application/json"}
    assert set(report["application/json"]["schema"]["properties"]) == set(report_json_schema()["properties"])
    assert set(report_json_schema()["$defs"]) <= set(schemas)  # its definitions became components
    assert itself["type"] == "object" and jsonschema.Draft202012Validator(itself).is_valid(document)


def test_artifacts_are_described_with_every_type_they_are_stored_with(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    download = document["paths"]["/audits/{audit_id}/artifacts/{name}"]["get"]["responses"]["200"]["content"]

    assert set(download) == {"application/json", *ARTIFACT_FILE_TYPES}
    assert {"application/octet-stream", "application/zip", "image/png", "text/plain"} <= set(download)


def test_the_document_states_the_input_rules_the_api_enforces(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    schemas, paths = document["components"]["schemas"], document["paths"]
    revoke = paths["/tokens/{token_id}"]["delete"]
    idempotency_key = next(p for p in paths["/audits"]["post"]["parameters"] if p["name"] == "Idempotency-Key")
    offset = next(p for p in paths["/audits"]["get"]["parameters"] if p["name"] == "offset")

    assert revoke["parameters"][0]["schema"] == {"type": "integer", "minimum": 0, "maximum": PG_INTEGER_MAX}
    assert offset["schema"]["maximum"] == PG_BIGINT_MAX
    assert idempotency_key["schema"] == {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH,
                                         "pattern": NUL_FREE_PATTERN}
    assert schemas["TokenCreate"]["properties"]["name"]["pattern"] == NUL_FREE_PATTERN
    assert schemas["ApiSpec"]["properties"]["auth_value"]["anyOf"][0]["pattern"] == NUL_FREE_PATTERN
    assert "pattern" not in schemas["TokenOut"]["properties"]["name"]  # replies are described as they are
    for path, methods in paths.items():
        for method, op in methods.items():
            assert "422" in op["responses"], (method, path)  # any path value or header may be unstorable


def test_links_lead_from_a_new_audit_and_token_to_their_operations(sqlite_api: Api) -> None:
    document = sqlite_api.client.get("/api/v1/openapi.json").get_json()
    operation_ids = {op["operationId"] for methods in document["paths"].values() for op in methods.values()}
    submitted = document["paths"]["/audits"]["post"]["responses"]["202"]["links"]
    created = document["paths"]["/tokens"]["post"]["responses"]["201"]["links"]

    assert submitted["get_audit"] == {"operationId": "audits.get_audit", "parameters": {"audit_id": "$response.body#/id"}}
    assert {link["operationId"] for link in submitted.values()} == {
        op for op in operation_ids if op.startswith("audits.") and op not in ("audits.create_audit", "audits.list_audits",
                                                                               "audits.download_artifact")
    }
    assert created["revoke_token"]["parameters"] == {"token_id": "$response.body#/id"}
