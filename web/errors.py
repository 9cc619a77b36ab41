"""One error envelope for the whole API: ``{"error": {"code", "message", "detail"}}``.

Services raise ``AuditError`` with a stable ``ErrorCode``; this module is the single
place that turns a code into an HTTP status, so a client can rely on the code and the
status never disagrees with it. Framework errors (unknown route, body too large) and
store lookups that miss are folded into the same envelope.

The portal shares these handlers: the same code and status, but a person browsing gets
a readable page instead of JSON. Anything under ``/api/`` and any request that asks for
JSON (the portal's own script) keeps the envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from auditor.errors import AuditError, ErrorCode
from auditor.store.artifacts import ArtifactNotFound
from auditor.store.audits import AuditNotFound
from web.inputs import too_large_message

log = logging.getLogger(__name__)

#: Every code's HTTP status. Input errors are 422 (the request reached us, but its
#: content is refused: a bad parameter, malformed JSON, a value the database cannot
#: store); codes a running audit records (API_*, WORKER_LOST, CANCELLED) are listed so
#: a new code cannot be forgotten.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_CHECKPOINT: 422,
    ErrorCode.INVALID_DATASET: 422,
    ErrorCode.INVALID_SPEC: 422,
    ErrorCode.DATASET_TOO_LARGE: 422,
    ErrorCode.UNSAFE_ARCHIVE: 422,
    ErrorCode.DATASET_NOT_FOUND: 422,
    ErrorCode.MODEL_DATA_MISMATCH: 422,
    ErrorCode.URL_NOT_ALLOWED: 422,
    ErrorCode.QUERY_BUDGET_EXHAUSTED: 422,
    ErrorCode.INSUFFICIENT_QUERY_BUDGET: 422,
    ErrorCode.API_UNREACHABLE: 502,
    ErrorCode.API_BAD_RESPONSE: 502,
    ErrorCode.API_AUTH_FAILED: 502,
    ErrorCode.API_TIMEOUT: 504,
    ErrorCode.MLFLOW_UNREACHABLE: 502,
    ErrorCode.MLFLOW_NOT_FOUND: 422,
    ErrorCode.MLFLOW_AUTH_FAILED: 502,
    ErrorCode.MLFLOW_BAD_RESPONSE: 502,
    ErrorCode.CANCELLED: 409,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.REPORT_NOT_READY: 409,
    ErrorCode.WORKER_LOST: 500,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.DATABASE_UNAVAILABLE: 503,
    ErrorCode.TIME_LIMIT: 500,
    ErrorCode.SANDBOX_LIMIT_EXCEEDED: 500,
    ErrorCode.SANDBOX_CRASHED: 500,
    ErrorCode.SANDBOX_UNAVAILABLE: 503,
}

#: Framework statuses without a domain error behind them.
_HTTP_EXCEPTION_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 500)


def not_found(what: str = "resource") -> AuditError:
    """The one answer for "missing" and "someone else's": both must look the same."""
    return AuditError(ErrorCode.NOT_FOUND, f"No such {what}.")


def error_response(code: ErrorCode, message: str, detail: dict[str, Any] | None = None) -> Response:
    response = jsonify({"error": {"code": code.value, "message": message, "detail": detail or {}}})
    response.status_code = http_status(code)
    if code == ErrorCode.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="refine-audit"'
    return response


#: Page titles for the statuses a person can meet in the portal.
PAGE_TITLES: dict[int, str] = {
    400: "That request could not be accepted",
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Not possible right now",
    413: "The upload is too large",
    422: "That input could not be accepted",
    503: "The service is busy or unavailable",
}


def wants_page() -> bool:
    """A browser page request, not the API and not the portal's own fetch calls."""
    if request.path.startswith("/api/") or request.path.endswith(".json"):
        return False
    return request.accept_mimetypes.best != "application/json"


def error_page(status: int, message: str, code: ErrorCode) -> Response:
    """A friendly page with the same status; internals never appear in it."""
    title = PAGE_TITLES.get(status, "Something went wrong" if status >= 500 else "That did not work")
    html = render_template("portal/error.html", status=status, title=title, message=message, code=code.value)
    return Response(html, status=status, mimetype="text/html")


def respond(code: ErrorCode, message: str, detail: dict[str, Any] | None = None, status: int | None = None) -> Response:
    """The envelope, or the error page for browser pages, with one status either way."""
    if wants_page():
        return error_page(status or http_status(code), message, code)
    response = error_response(code, message, detail)
    if status is not None:
        response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the envelope for domain errors, framework errors and crashes."""
    app.register_error_handler(AuditError, _audit_error)
    app.register_error_handler(AuditNotFound, lambda _exc: respond(ErrorCode.NOT_FOUND, "No such audit."))
    app.register_error_handler(ArtifactNotFound, lambda _exc: respond(ErrorCode.NOT_FOUND, "No such artifact."))
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _audit_error(exc: AuditError) -> Response:
    return respond(exc.code, exc.message, exc.detail)


def _http_error(exc: HTTPException) -> Response:
    """The framework's exact status (e.g. 406) and its headers (``Allow`` on a 405), in our envelope."""
    status = exc.code or 500
    code = _HTTP_EXCEPTION_CODES.get(status, ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST)
    message, detail = exc.description or exc.name, {}
    if status == 413:
        message, detail = too_large_message()
    response = respond(code, message, detail, status)
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected_error(exc: Exception) -> Response:
    """Log the traceback for operators; tell the client nothing about internals."""
    log.exception("unhandled error in request", exc_info=exc)
    return respond(ErrorCode.INTERNAL_ERROR, "An unexpected error occurred; it has been logged.")
