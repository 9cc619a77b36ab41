"""Domain errors with stable codes.

Every failure a user can see carries a code from ``ErrorCode``; the CLI maps the
code to an exit status and the web layer to an HTTP status, so the code is the
contract and the message is for people.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    INVALID_CHECKPOINT = "invalid_checkpoint"
    INVALID_DATASET = "invalid_dataset"
    INVALID_SPEC = "invalid_spec"
    DATASET_TOO_LARGE = "dataset_too_large"
    UNSAFE_ARCHIVE = "unsafe_archive"
    DATASET_NOT_FOUND = "dataset_not_found"
    MODEL_DATA_MISMATCH = "model_data_mismatch"
    API_UNREACHABLE = "api_unreachable"
    API_BAD_RESPONSE = "api_bad_response"
    API_AUTH_FAILED = "api_auth_failed"
    API_TIMEOUT = "api_timeout"
    QUERY_BUDGET_EXHAUSTED = "query_budget_exhausted"
    INSUFFICIENT_QUERY_BUDGET = "insufficient_query_budget"  # refused before any work: the plan needs more queries
    URL_NOT_ALLOWED = "url_not_allowed"
    # A model read from the operator's MLflow tracking server (model.mlflow in the spec).
    MLFLOW_UNREACHABLE = "mlflow_unreachable"  # no server configured, connection refused, timeout or 5xx
    MLFLOW_NOT_FOUND = "mlflow_not_found"  # no such registered model, version, run or artifact
    MLFLOW_AUTH_FAILED = "mlflow_auth_failed"  # the server refused our credentials (401/403)
    MLFLOW_BAD_RESPONSE = "mlflow_bad_response"  # an answer we cannot use, e.g. artifacts the server does not proxy
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal_error"
    # Service-level codes (the REST API and the worker); web/errors.py maps each to an HTTP status.
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REPORT_NOT_READY = "report_not_ready"
    WORKER_LOST = "worker_lost"
    INVALID_REQUEST = "invalid_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    SERVICE_UNAVAILABLE = "service_unavailable"
    # Worker-level codes: infrastructure that stayed down through every retry, or the hard clock.
    STORAGE_UNAVAILABLE = "storage_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    TIME_LIMIT = "time_limit"
    # The sandbox a submitted model runs in: a limit it hit, a death without a result, or no sandbox at all.
    SANDBOX_LIMIT_EXCEEDED = "sandbox_limit_exceeded"
    SANDBOX_CRASHED = "sandbox_crashed"
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"


#: Errors caused by what the user submitted (as opposed to a failure while running).
INPUT_ERRORS = frozenset(
    {
        ErrorCode.INVALID_CHECKPOINT,
        ErrorCode.INVALID_DATASET,
        ErrorCode.INVALID_SPEC,
        ErrorCode.DATASET_TOO_LARGE,
        ErrorCode.UNSAFE_ARCHIVE,
        ErrorCode.DATASET_NOT_FOUND,
        ErrorCode.MODEL_DATA_MISMATCH,
        ErrorCode.URL_NOT_ALLOWED,
        ErrorCode.INSUFFICIENT_QUERY_BUDGET,
        ErrorCode.MLFLOW_NOT_FOUND,
    }
)


class AuditError(Exception):
    """An error with a stable code, a human message and optional structured detail."""

    def __init__(self, code: ErrorCode, message: str, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.detail = detail or {}

    @property
    def is_input_error(self) -> bool:
        return self.code in INPUT_ERRORS

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "detail": self.detail}

    def __repr__(self) -> str:
        return f"AuditError({self.code.value!r}, {self.message!r})"


class AuditCancelled(AuditError):
    """Raised between batches when the caller asked to stop; not a failure."""

    def __init__(self, message: str = "The audit was cancelled."):
        super().__init__(ErrorCode.CANCELLED, message)
