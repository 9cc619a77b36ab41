"""What the API refuses: missing or bad tokens, other owners' audits, executable or
malformed checkpoints, hostile archives, private URLs, invalid specs, oversized bodies.
Every refusal must leave nothing behind: no row, no stored file, nothing enqueued."""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from api_support import (  # noqa: F401 (fixtures)
    MAX_UPLOAD_MB,
    TINY_SPEC,
    Api,
    api,
    api_factory,
    api_spec,
    auth,
    checkpoint,
    sqlite_api,
)

from auditor.models import ArchConfig, build_classifier, export_torchscript
from web.api.registry import OPERATIONS, Operation

UPLOAD_SPEC = {**TINY_SPEC, "data": {"source": "upload"}}


class Exploit:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def concrete_path(op: Operation, audit_id: str) -> str:
    path = re.sub(r"<(?:\w+:)?audit_id>", audit_id, op.rule)
    path = re.sub(r"<int:\w+>", "1", path)
    return "/api/v1" + re.sub(r"<(?:\w+:)?\w+>", "inputs/model", path)


def assert_nothing_created(api: Api, token: str) -> None:
    assert api.client.get("/api/v1/audits", headers=auth(token)).json["total"] == 0
    assert api.queue.sent == []
    assert api.store.list("audits/") == []


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


# --- authentication and ownership ---------------------------------------------------------


def test_every_protected_route_needs_a_valid_token(sqlite_api: Api) -> None:
    protected = [op for op in OPERATIONS if op.auth]
    assert len(protected) >= 12
    for op in protected:
        path = concrete_path(op, "00000000-0000-0000-0000-000000000000")
        for token in (None, "ra_made-up"):
            response = sqlite_api.client.open(path, method=op.method.upper(), headers=auth(token) if token else {})
            assert response.status_code == 401, (op.method, path)
            assert response.json["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_token_stops_working(sqlite_api: Api) -> None:
    token = sqlite_api.token()
    token_id = sqlite_api.client.get("/api/v1/tokens", headers=auth(token)).json["items"][0]["id"]

    revoked = sqlite_api.client.delete(f"/api/v1/tokens/{token_id}", headers=auth(token))

    assert revoked.status_code == 204
    assert sqlite_api.client.get("/api/v1/audits", headers=auth(token)).status_code == 401


def test_another_owners_audit_is_not_found_on_every_route(api: Api, checkpoint: bytes) -> None:
    owner, stranger = api.token(), api.token()
    audit_id = api.submit(owner, checkpoint, TINY_SPEC).json["id"]
    per_audit = [op for op in OPERATIONS if "<audit_id>" in op.rule]
    assert len(per_audit) >= 9

    for op in per_audit:
        path = concrete_path(op, audit_id)
        response = api.client.open(path, method=op.method.upper(), headers=auth(stranger))
        assert response.status_code == 404, (op.method, path)
        assert response.json["error"]["code"] == "not_found"
    assert api.client.get(f"/api/v1/audits/{audit_id}", headers=auth(owner)).json["status"] == "queued"
    assert api.client.get("/api/v1/audits", headers=auth(stranger)).json["total"] == 0


def test_tokens_of_another_user_cannot_be_revoked(sqlite_api: Api) -> None:
    owner, stranger = sqlite_api.token(), sqlite_api.token()
    token_id = sqlite_api.client.get("/api/v1/tokens", headers=auth(owner)).json["items"][0]["id"]

    response = sqlite_api.client.delete(f"/api/v1/tokens/{token_id}", headers=auth(stranger))

    assert response.status_code == 404
    assert sqlite_api.client.get("/api/v1/audits", headers=auth(owner)).status_code == 200


def test_a_token_created_through_the_api_is_shown_once_and_works(sqlite_api: Api) -> None:
    token = sqlite_api.token()

    created = sqlite_api.client.post("/api/v1/tokens", json={"name": "ci"}, headers=auth(token))
    listed = sqlite_api.client.get("/api/v1/tokens", headers=auth(token))

    assert created.status_code == 201 and created.json["token"].startswith("ra_")
    assert sqlite_api.client.get("/api/v1/audits", headers=auth(created.json["token"])).status_code == 200
    assert created.json["token"] not in listed.get_data(as_text=True)


# --- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["pickle", "torch.save zip"])
def test_a_pickle_checkpoint_is_refused_without_being_executed(
    sqlite_api: Api, tmp_path: Path, container: str
) -> None:
    token = sqlite_api.token()
    marker = tmp_path / "executed"
    if container == "pickle":
        payload = pickle.dumps(Exploit(marker))
    else:
        buffer = io.BytesIO()
        torch.save({"weights": Exploit(marker)}, buffer)
        payload = buffer.getvalue()

    response = sqlite_api.submit(token, payload, TINY_SPEC)

    assert response.status_code == 422
    assert response.json["error"]["code"] == "invalid_checkpoint"
    assert not marker.exists()
    assert_nothing_created(sqlite_api, token)


def test_garbage_and_missing_checkpoints_are_refused(sqlite_api: Api) -> None:
    token = sqlite_api.token()

    garbage = sqlite_api.submit(token, b"not a model at all", TINY_SPEC)
    missing = sqlite_api.submit(token, None, TINY_SPEC)

    assert garbage.status_code == missing.status_code == 422
    assert garbage.json["error"]["code"] == missing.json["error"]["code"] == "invalid_checkpoint"
    assert missing.json["error"]["detail"]["field"] == "model"


def test_torchscript_and_bare_state_dicts_are_accepted(sqlite_api: Api, tmp_path: Path) -> None:
    token = sqlite_api.token()
    model = build_classifier(ArchConfig("small_cnn", num_classes=10, width=4))
    scripted = export_torchscript(model, torch.zeros(2, 1, 28, 28), tmp_path / "model.pt").read_bytes()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)

    for payload in (scripted, buffer.getvalue()):
        assert sqlite_api.submit(token, payload, TINY_SPEC).status_code == 202


# --- datasets -----------------------------------------------------------------------------


def test_a_zip_with_parent_directory_entries_is_an_unsafe_archive(sqlite_api: Api, checkpoint: bytes) -> None:
    token = sqlite_api.token()
    archive = zip_bytes({"cats/ok.png": b"x", "../../etc/evil.png": b"x"})

    response = sqlite_api.submit(token, checkpoint, UPLOAD_SPEC, dataset=archive)

    assert response.status_code == 422
    assert response.json["error"]["code"] == "unsafe_archive"
    assert_nothing_created(sqlite_api, token)


def test_a_zip_bomb_is_refused(sqlite_api: Api, checkpoint: bytes) -> None:
    token = sqlite_api.token()
    archive = zip_bytes({"a/bomb.png": b"\0" * (8 * 1024 * 1024), "b/x.png": b"x"})
    assert len(archive) < 100_000

    response = sqlite_api.submit(token, checkpoint, UPLOAD_SPEC, dataset=archive)

    assert response.status_code == 422
    assert response.json["error"]["code"] in ("unsafe_archive", "dataset_too_large")
    assert_nothing_created(sqlite_api, token)


def test_a_valid_npz_dataset_is_stored_next_to_the_model(sqlite_api: Api, checkpoint: bytes) -> None:
    token = sqlite_api.token()
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((20, 28, 28), np.uint8), y=np.arange(20) % 10)

    response = sqlite_api.submit(token, checkpoint, UPLOAD_SPEC, dataset=buffer.getvalue())

    assert response.status_code == 202, response.json
    assert sqlite_api.store.get_bytes(f"audits/{response.json['id']}/inputs/dataset") == buffer.getvalue()


def test_dataset_and_spec_must_agree(sqlite_api: Api, checkpoint: bytes) -> None:
    token = sqlite_api.token()

    unused = sqlite_api.submit(token, checkpoint, TINY_SPEC, dataset=zip_bytes({"a/x.png": b"x"}))
    absent = sqlite_api.submit(token, checkpoint, UPLOAD_SPEC)

    assert unused.json["error"]["detail"]["fields"][0]["field"] == "data.source"
    assert absent.json["error"]["code"] == "invalid_dataset"


# --- URLs and specs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (api_spec("http://169.254.169.254/latest/meta-data"), "model.api.url"),
        (api_spec("http://10.0.0.1:8080/v1/models/m:predict"), "model.api.url"),
        (api_spec(callback_url="http://10.0.0.1/hook"), "callback_url"),
        (api_spec(callback_url="http://[::ffff:169.254.169.254]/hook"), "callback_url"),
    ],
)
def test_private_and_metadata_urls_are_not_allowed(sqlite_api: Api, spec: dict, field: str) -> None:
    token = sqlite_api.token()

    response = sqlite_api.submit_json(token, spec)

    assert response.status_code == 422
    assert response.json["error"]["code"] == "url_not_allowed"
    assert response.json["error"]["detail"]["field"] == field
    assert_nothing_created(sqlite_api, token)


def test_a_checkpoint_callback_to_a_private_address_is_refused(sqlite_api: Api, checkpoint: bytes) -> None:
    token = sqlite_api.token()

    response = sqlite_api.submit(token, checkpoint, {**TINY_SPEC, "callback_url": "http://10.0.0.1/done"})

    assert response.json["error"]["code"] == "url_not_allowed"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"effort": "enormous"}, "effort"),
        ({"refine": {"epochs": 0}}, "refine.epochs"),
        ({"controls": {"attacks": ["nonexistent"]}}, "controls.attacks"),
        ({"surprise": True}, "surprise"),
        ('{"effort": ', "spec"),
    ],
)
def test_an_invalid_spec_names_the_field_at_fault(sqlite_api: Api, checkpoint: bytes, spec, field: str) -> None:
    token = sqlite_api.token()

    response = sqlite_api.submit(token, checkpoint, spec)

    assert response.status_code == 422
    assert response.json["error"]["code"] == "invalid_spec"
    assert response.json["error"]["detail"]["fields"][0]["field"] == field
    assert_nothing_created(sqlite_api, token)


def test_a_checkpoint_spec_cannot_come_as_json(sqlite_api: Api) -> None:
    token = sqlite_api.token()

    response = sqlite_api.submit_json(token, TINY_SPEC)
    plain = sqlite_api.client.post("/api/v1/audits", data="x", content_type="text/plain", headers=auth(token))

    assert response.json["error"]["code"] == "invalid_checkpoint"
    assert plain.status_code == 415 and plain.json["error"]["code"] == "unsupported_media_type"


def test_an_oversized_upload_is_refused_with_413(sqlite_api: Api) -> None:
    token = sqlite_api.token()
    payload = os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1024)

    response = sqlite_api.submit(token, payload, TINY_SPEC)

    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert response.json["error"]["detail"]["max_bytes"] == MAX_UPLOAD_MB * 1024 * 1024
    assert_nothing_created(sqlite_api, token)
