"""What the web app accepts from a request: values the database can store, and uploads
within their limit per file.

PostgreSQL refuses two kinds of values a client can easily send: text containing the
NUL character (U+0000) and integers beyond its column types (``integer`` for row ids,
``bigint`` elsewhere); JSON columns refuse NaN and infinities as well. Left alone they
surface as a 500 from deep inside a query. ``CheckedRequest`` refuses them where the
framework decodes them (query string, form fields, JSON bodies) and
``refuse_unstorable_path_and_headers`` where routing does, so no view has to remember;
every refusal is a 422 ``invalid_request`` naming each field at fault. JSON that the
application decodes itself (an audit spec sent as a form part) goes through
``refuse_unstorable`` with the same rule.

Uploads are limited per file: ``REFINE_AUDIT_MAX_UPLOAD_MB`` applies to the model and to
the dataset each, as the README says. The multipart parser streams every file part to
a temporary file (on disk past a small buffer) and stops reading the moment one passes
the limit, answering 413 ``payload_too_large`` with the field and the limit. The whole
body is capped at two files plus ``FORM_ALLOWANCE`` for the other fields, and a body
without files at ``FORM_ALLOWANCE``, so a huge request is cut off early and never held
in memory.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from flask import Flask, Request, current_app, request
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import File

from auditor.errors import AuditError, ErrorCode
from auditor.settings import Settings

#: PostgreSQL's ``integer`` (every row id) and ``bigint`` ranges.
PG_INTEGER_MAX = 2**31 - 1
PG_BIGINT_MIN, PG_BIGINT_MAX = -(2**63), 2**63 - 1
NUL = "\x00"
NUL_MESSAGE = "must not contain the NUL character (\\u0000)"

MIB = 1024 * 1024
#: Room for everything in a request besides its files: the spec, form fields, a JSON body.
FORM_ALLOWANCE = MIB
#: Files one submission carries at most (a model and a dataset).
FILES_PER_REQUEST = 2
#: A file part stays in memory up to this size, then moves to a temporary file.
SPOOL_BYTES = 512 * 1024
MAX_FILE_BYTES_KEY = "REFINE_AUDIT_MAX_FILE_BYTES"

_WHOLE_NUMBER = re.compile(r"[+-]?\d+")


# --- the rule -------------------------------------------------------------------------------


def unstorable(value: Any, *, int_max: int = PG_BIGINT_MAX) -> str | None:
    """Why the database could not store ``value`` (one scalar), or None when it can."""
    if isinstance(value, str):
        return NUL_MESSAGE if NUL in value else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not PG_BIGINT_MIN <= value <= int_max:
        return f"must be between {PG_BIGINT_MIN} and {int_max}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


def unstorable_fields(value: Any, field: str = "") -> Iterator[dict[str, str]]:
    """``{"field", "message"}`` for every value inside ``value`` (nested JSON included),
    named by dotted path the way request validation names fields."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{field}.{key}" if field else str(key)
            if NUL in str(key):
                yield {"field": path, "message": f"the key {NUL_MESSAGE}"}
            yield from unstorable_fields(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from unstorable_fields(item, f"{field}.{index}" if field else str(index))
    elif (problem := unstorable(value)) is not None:
        yield {"field": field or "(root)", "message": problem}


def refuse_unstorable(value: Any) -> None:
    """Raise 422 ``invalid_request`` naming every field the database could not store."""
    raise_for_fields(list(unstorable_fields(value)))


def raise_for_fields(fields: list[dict[str, str]]) -> None:
    if fields:
        first = fields[0]
        raise AuditError(ErrorCode.INVALID_REQUEST, f"{first['field']}: {first['message']}", {"fields": fields})


def _parameter_problems(items: Iterable[tuple[str, Any]]) -> Iterator[dict[str, str]]:
    """Query and form values arrive as text: a whole number is checked against ``bigint``,
    since no parameter can mean a number the database cannot hold."""
    for name, value in items:
        if not isinstance(value, str):
            continue  # an uploaded file: its bytes are stored as a file, not in the database
        problem = unstorable(value)
        if problem is None and _WHOLE_NUMBER.fullmatch(value.strip()):
            problem = unstorable(int(value))
        if problem is not None:
            yield {"field": name, "message": problem}


# --- the request ----------------------------------------------------------------------------


class StorableParameters(ImmutableMultiDict[str, Any]):
    """Query and form parameters, refused as they are decoded when a value cannot be stored."""

    def __init__(self, mapping: Any = None) -> None:
        super().__init__(mapping)
        raise_for_fields(list(_parameter_problems(self.items(multi=True))))


class _CappedFile(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """One uploaded file part; writing past ``limit`` stops the upload with 413."""

    def __init__(self, field: str, limit: int) -> None:
        super().__init__(max_size=SPOOL_BYTES, mode="w+b")
        self.field, self.limit, self.written = field, limit, 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.written += len(data)
        if self.written > self.limit:
            self.close()
            raise file_too_large(self.field, self.limit)
        return super().write(data)


def file_too_large(field: str, limit: int) -> AuditError:
    return AuditError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"{field}: the file is larger than the upload limit of {_size(limit)} per file (REFINE_AUDIT_MAX_UPLOAD_MB).",
        {"field": field, "max_bytes": limit},
    )


class _PerFileMultiPartParser(MultiPartParser):
    def __init__(self, *args: Any, file_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.file_limit = file_limit

    def start_file_streaming(self, event: File, total_content_length: int | None) -> IO[bytes]:
        return _CappedFile(event.name, self.file_limit)  # type: ignore[return-value]


class _PerFileFormDataParser(FormDataParser):
    """Werkzeug's form parser with every file part capped by its own limit.

    ``_parse_multipart`` is werkzeug's own, with our multipart parser in it (werkzeug has no
    public hook that knows a part's field name); ``tests/integration/test_api_inputs.py``
    fails if a werkzeug release changes that.
    """

    def __init__(self, *args: Any, file_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.file_limit = file_limit

    def _parse_multipart(
        self, stream: IO[bytes], mimetype: str, content_length: int | None, options: dict[str, str]
    ) -> tuple[IO[bytes], Any, Any]:
        parser = _PerFileMultiPartParser(
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
            file_limit=self.file_limit,
        )
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class CheckedRequest(Request):
    """Flask's request with storable parameters, strict JSON and upload limits per file."""

    parameter_storage_class = StorableParameters

    @property
    def max_content_length(self) -> int | None:
        """Files only come as multipart; any other body gets the small allowance."""
        if self.mimetype == "multipart/form-data":
            return current_app.config["MAX_CONTENT_LENGTH"]
        return FORM_ALLOWANCE

    def make_form_data_parser(self) -> FormDataParser:
        return _PerFileFormDataParser(
            max_form_memory_size=self.max_form_memory_size,
            max_content_length=self.max_content_length,
            max_form_parts=self.max_form_parts,
            cls=self.parameter_storage_class,
            file_limit=current_app.config[MAX_FILE_BYTES_KEY],
        )

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        body = super().get_json(force=force, silent=silent, cache=cache)
        refuse_unstorable(body)
        return body

    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        if e is None:
            raise AuditError(
                ErrorCode.UNSUPPORTED_MEDIA_TYPE, "Send the body as application/json.", {"content_type": self.mimetype}
            )
        raise AuditError(
            ErrorCode.INVALID_REQUEST, f"The body is not valid JSON: {e}", {"fields": [{"field": "(body)", "message": str(e)}]}
        )


def refuse_unstorable_path_and_headers() -> None:
    """``before_request``: values routing decoded from the path, and the headers.

    Integer path values are row ids, so they are checked against ``integer``. Headers are
    only checked for NUL: clients send long numeric trace ids that nothing here stores.
    """
    problems = []
    for name, value in (request.view_args or {}).items():
        if (problem := unstorable(value, int_max=PG_INTEGER_MAX)) is not None:
            problems.append({"field": name, "message": problem})
    problems += [{"field": name, "message": NUL_MESSAGE} for name, value in request.headers.items() if NUL in value]
    raise_for_fields(problems)


def too_large_message() -> tuple[str, dict[str, Any]]:
    """What a 413 from the framework (the whole body over its cap) tells the client."""
    per_file = current_app.config[MAX_FILE_BYTES_KEY]
    detail = {"max_bytes": request.max_content_length, "max_file_bytes": per_file, "max_field_bytes": FORM_ALLOWANCE}
    if request.mimetype == "multipart/form-data":
        message = (
            f"The request is larger than this service accepts: each file at most {_size(per_file)} "
            f"(REFINE_AUDIT_MAX_UPLOAD_MB), at most {FILES_PER_REQUEST} files, "
            f"and {_size(FORM_ALLOWANCE)} for each other field."
        )
    else:
        message = f"A request body without files may be at most {_size(FORM_ALLOWANCE)}; send files as multipart/form-data."
    return message, detail


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB"


def install(app: Flask, settings: Settings) -> None:
    """Use ``CheckedRequest`` and the size limits derived from ``settings``."""
    app.request_class = CheckedRequest
    app.config.update(
        MAX_CONTENT_LENGTH=FILES_PER_REQUEST * settings.max_upload_bytes + FORM_ALLOWANCE,
        MAX_FORM_MEMORY_SIZE=FORM_ALLOWANCE,
        **{MAX_FILE_BYTES_KEY: settings.max_upload_bytes},
    )
    app.before_request(refuse_unstorable_path_and_headers)
