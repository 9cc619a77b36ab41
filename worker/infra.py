"""Which failures are the infrastructure's fault, and therefore worth retrying.

The rule: retry transient infrastructure errors (an S3 endpoint or the database
briefly unreachable), never a training failure. This module draws that line in one
place: ``transient_error(exc)`` turns a boto/botocore or SQLAlchemy connection-level
exception into a ``TransientInfraError`` carrying the error code to store if retries
run out, and returns None for everything else. One exception never counts as
transient however it looks: a database call broken by Celery's soft time limit
(``interrupted_by_time_limit``) -- the audit ran out of time, and a retry would too.
"""

from __future__ import annotations

from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
from boto3.exceptions import S3UploadFailedError
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from auditor.errors import ErrorCode

#: S3 error codes that mean "the server is unwell right now", not "your request is wrong".
TRANSIENT_S3_CODES = frozenset(
    {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
)


class TransientInfraError(Exception):
    """A dependency was unreachable; the task retries, and the last retry records ``code``."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class StorageUnavailable(TransientInfraError):
    code = ErrorCode.STORAGE_UNAVAILABLE


class DatabaseUnavailable(TransientInfraError):
    code = ErrorCode.DATABASE_UNAVAILABLE


def transient_error(exc: BaseException) -> TransientInfraError | None:
    """The retryable wrapper for ``exc`` (or a cause in its chain), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        wrapped = _classify(current)
        if wrapped is not None:
            return wrapped
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException) -> TransientInfraError | None:
    if isinstance(exc, TransientInfraError):
        return exc
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return StorageUnavailable(f"The artifact store is unreachable: {exc}")
    if isinstance(exc, ClientError) and _s3_code(exc) in TRANSIENT_S3_CODES:
        return StorageUnavailable(f"The artifact store failed: {exc}")
    if isinstance(exc, S3UploadFailedError) and _looks_transient(str(exc)):
        return StorageUnavailable(f"An upload to the artifact store failed: {exc}")
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return DatabaseUnavailable(f"The database is unreachable: {_first_line(exc)}")
    return None


def _s3_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _looks_transient(message: str) -> bool:
    """boto3's transfer manager flattens the cause into the message; read the code back."""
    return any(code in message for code in TRANSIENT_S3_CODES) or "Could not connect" in message


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def interrupted_by_time_limit(exc: BaseException) -> bool:
    """Whether Celery's soft time limit is what broke this database call.

    The limit arrives as a signal and can land inside a query; the driver then fails on its
    half-sent command and SQLAlchemy raises *that* failure, with the time limit only in its
    context. Taken for a hiccup, the limit would be lost: a skipped progress write let the
    audit run on until the sandbox's own clock killed it (``sandbox_limit_exceeded``
    instead of ``time_limit``, seen in CI), and a "transient" error would requeue an audit
    that has already used up its time, to run out of it again.
    """
    seen: BaseException | None = exc
    for _ in range(16):  # a context chain is short; the bound only guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, SoftTimeLimitExceeded):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
