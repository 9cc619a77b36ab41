"""What the API answers to input it cannot use, on SQLite and PostgreSQL: values the
database cannot store (NUL characters, integers beyond its columns, NaN), malformed
JSON, methods a route does not have, and uploads over their limit per file. Every answer
is the error envelope with a stable code and the field at fault; none is a 500, and none
leaves anything behind."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from api_support import TINY_SPEC, Api, api, api_factory, api_spec, auth, checkpoint  # noqa: F401 (fixtures)
from api_support import checkpoint_bytes
from sqlalchemy import Engine

from web.inputs import PG_INTEGER_MAX

MIB = 1024 * 1024
UPLOAD_SPEC = {**TINY_SPEC, "data": {"source": "upload"}}


def refused_field(response, code: str = "invalid_request", status: int = 422) -> str:
    """The first field named by an error envelope, after checking status and code."""
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert set(error) == {"code", "message", "detail"} and error["code"] == code
    return error["detail"]["fields"][0]["field"] if "fields" in error["detail"] else error["detail"]["field"]


def assert_nothing_stored(api: Api, token: str) -> None:
    assert api.client.get("/api/v1/audits", headers=auth(token)).json["total"] == 0
    assert [t["name"] for t in api.client.get("/api/v1/tokens", headers=auth(token)).json["items"]] == ["test"]
    assert api.queue.sent == []


# --- what the database cannot store ---------------------------------------------------------


def test_a_nul_character_anywhere_is_refused_naming_the_field(api: Api, checkpoint: bytes) -> None:
    token = api.token()
    nul_header = api_spec()
    nul_header["model"]["api"]["auth_header"] = "X-Key\x00"
    nul_attack = {**TINY_SPEC, "controls": {"attacks": ["bad\x00nets"]}}

    assert refused_field(api.client.post("/api/v1/tokens", json={"name": "ci\x00"}, headers=auth(token))) == "name"
    assert refused_field(api.submit_json(token, nul_header)) == "model.api.auth_header"
    assert refused_field(api.submit(token, checkpoint, json.dumps(nul_attack))) == "controls.attacks.0"
    assert refused_field(api.client.get("/api/v1/audits?status=queued%00", headers=auth(token))) == "status"
    assert refused_field(api.client.get("/api/v1/audits/a%00b", headers=auth(token))) == "audit_id"
    assert refused_field(api.submit_json(token, api_spec(), headers={"Idempotency-Key": "k\x00"})) == "Idempotency-Key"
    assert_nothing_stored(api, token)


def test_integers_beyond_their_column_are_refused_naming_the_field(api: Api) -> None:
    token = api.token()
    huge_seed = json.dumps(api_spec()).replace('"effort"', '"seed": 99999999999999999999, "effort"')

    assert refused_field(api.client.get("/api/v1/audits?offset=10000000000000000001", headers=auth(token))) == "offset"
    assert refused_field(api.client.delete(f"/api/v1/tokens/{PG_INTEGER_MAX + 1}", headers=auth(token))) == "token_id"
    assert refused_field(api.client.delete("/api/v1/tokens/99999999999999999999", headers=auth(token))) == "token_id"
    assert refused_field(api.client.post("/api/v1/audits", data=huge_seed, content_type="application/json",
                                         headers=auth(token))) == "seed"
    assert api.client.delete(f"/api/v1/tokens/{PG_INTEGER_MAX}", headers=auth(token)).status_code == 404
    assert_nothing_stored(api, token)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_numbers_json_cannot_store_are_refused(api: Api, number: str) -> None:
    token = api.token()
    spec = api_spec()
    spec["model"]["api"]["rate_limit_per_s"] = 1.0
    body = json.dumps(spec).replace('"rate_limit_per_s": 1.0', f'"rate_limit_per_s": {number}')

    response = api.client.post("/api/v1/audits", data=body, content_type="application/json", headers=auth(token))

    assert refused_field(response) == "model.api.rate_limit_per_s"
    assert_nothing_stored(api, token)


# --- malformed requests ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/tokens", "/api/v1/audits"])
def test_a_malformed_json_body_is_reported_as_such(api: Api, path: str) -> None:
    token = api.token()

    response = api.client.post(path, data='{"name": "ci",', content_type="application/json", headers=auth(token))

    assert refused_field(response) == "(body)"
    assert response.json["error"]["message"].startswith("The body is not valid JSON: Expecting")
    assert_nothing_stored(api, token)


def test_a_json_body_must_be_an_object_and_sent_as_json(api: Api) -> None:
    token = api.token()

    array = api.client.post("/api/v1/tokens", json=["ci"], headers=auth(token))
    plain = api.client.post("/api/v1/tokens", data='{"name": "ci"}', content_type="text/plain", headers=auth(token))

    assert refused_field(array) == "(root)" and array.json["error"]["message"] == "The body must be a JSON object."
    assert (plain.status_code, plain.json["error"]["code"]) == (415, "unsupported_media_type")
    assert_nothing_stored(api, token)


def test_a_method_a_route_does_not_have_is_405_with_allow(api: Api) -> None:
    token = api.token()

    on_list = api.client.put("/api/v1/audits", headers=auth(token))
    on_token = api.client.patch("/api/v1/tokens/1", headers=auth(token))

    assert (on_list.status_code, on_list.json["error"]["code"]) == (405, "method_not_allowed")
    assert set(on_list.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "POST"}
    assert set(on_token.headers["Allow"].split(", ")) == {"DELETE", "OPTIONS"}


# --- upload limits, per file ----------------------------------------------------------------


@pytest.fixture
def api_5mb(api_factory, pg_engine: Engine) -> Api:  # noqa: F811 (fixture)
    return api_factory(pg_engine, REFINE_AUDIT_MAX_UPLOAD_MB="5")


@pytest.fixture(scope="module")
def model_1_1mb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real checkpoint just over 1.1 MiB (a small CNN of width 56)."""
    return checkpoint_bytes(tmp_path_factory.mktemp("model"), width=56)


def npz_of_size(size: int) -> bytes:
    """A valid dataset of 28x28 images, just under ``size`` bytes."""
    count = size // (28 * 28 + 8) - 1
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((count, 28, 28), np.uint8), y=np.arange(count) % 10)
    return buffer.getvalue()


def test_each_file_has_its_own_limit(api_5mb: Api, model_1_1mb: bytes) -> None:
    token = api_5mb.token()
    dataset = npz_of_size(int(4.5 * MIB))
    assert len(model_1_1mb) > 1.1 * MIB and 4.4 * MIB < len(dataset) < 4.5 * MIB  # together over 5 MiB

    response = api_5mb.submit(token, model_1_1mb, UPLOAD_SPEC, dataset=dataset)

    assert response.status_code == 202, response.json
    stored = api_5mb.store.get_bytes(f"audits/{response.json['id']}/inputs/dataset")
    assert stored == dataset


@pytest.mark.parametrize("field", ["model", "dataset"])
def test_a_file_over_the_limit_is_413_naming_the_field_and_the_limit(api_5mb: Api, model_1_1mb: bytes, field: str) -> None:
    token = api_5mb.token()
    too_big = bytes(int(5.1 * MIB))
    files = {"model": model_1_1mb, "dataset": npz_of_size(MIB), field: too_big}

    response = api_5mb.submit(token, files["model"], UPLOAD_SPEC, dataset=files["dataset"])

    assert refused_field(response, "payload_too_large", 413) == field
    assert response.json["error"]["detail"]["max_bytes"] == 5 * MIB
    assert "5 MiB per file" in response.json["error"]["message"]
    assert_nothing_stored(api_5mb, token)


class MultipartStream:
    """A multipart body with one ``model`` part of ``file_size`` zero bytes, made as it is
    read; ``position`` is how much of it the server consumed."""

    BOUNDARY = "refine-audit-boundary"

    def __init__(self, file_size: int):
        self.head = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.bin\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode()
        self.tail = f"\r\n--{self.BOUNDARY}--\r\n".encode()
        self.file_size, self.position = file_size, 0
        self.length = len(self.head) + file_size + len(self.tail)

    def read(self, size: int = -1) -> bytes:
        start, end = self.position, self.length if size < 0 else min(self.length, self.position + size)
        head_end, tail_start = len(self.head), len(self.head) + self.file_size
        piece = self.head[min(start, head_end):min(end, head_end)]
        piece += bytes(max(0, min(end, tail_start) - max(start, head_end)))
        piece += self.tail[max(start, tail_start) - tail_start:max(end, tail_start) - tail_start]
        self.position = end
        return piece

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:  # the test client measures the body this way
        self.position = offset + (self.length if whence == 2 else self.position if whence == 1 else 0)
        return self.position


def post_stream(api: Api, token: str, stream: MultipartStream, content_length: int) -> object:
    return api.client.post(
        "/api/v1/audits", input_stream=stream, content_length=content_length,
        content_type=f"multipart/form-data; boundary={MultipartStream.BOUNDARY}", headers=auth(token),
    )


def test_an_oversized_file_is_cut_off_as_it_streams_in(api_5mb: Api) -> None:
    token = api_5mb.token()
    stream = MultipartStream(file_size=9 * MIB)  # within the whole-request cap of two files

    response = post_stream(api_5mb, token, stream, stream.length)

    assert refused_field(response, "payload_too_large", 413) == "model"
    assert stream.position < 5 * MIB + 256 * 1024  # reading stopped at the limit, not at the end


def test_a_body_over_the_whole_request_cap_is_refused_before_it_is_read(api_5mb: Api) -> None:
    token = api_5mb.token()
    stream = MultipartStream(file_size=1024 * MIB)

    response = post_stream(api_5mb, token, stream, stream.length)
    small = api_5mb.client.post("/api/v1/tokens", data=json.dumps({"name": "x" * (2 * MIB)}),
                                content_type="application/json", headers=auth(token))

    assert (response.status_code, response.json["error"]["code"]) == (413, "payload_too_large")
    assert response.json["error"]["detail"] == {"max_bytes": 11 * MIB, "max_file_bytes": 5 * MIB, "max_field_bytes": MIB}
    assert stream.position == 0
    assert small.status_code == 413 and "without files may be at most 1 MiB" in small.json["error"]["message"]
