"""Both artifact stores behave the same: round trips, listing, prefix deletes, safe keys;
S3 against the real SeaweedFS started by scripts/services.sh, presigned URLs included."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests

from auditor.store.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidKey,
    LocalStore,
    S3Credentials,
    S3Store,
    audit_prefix,
)

PAYLOAD = b"weights" * 1000


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    s3: S3Store = request.getfixturevalue("s3_store")
    return s3


def test_put_and_get_round_trip_bytes_and_files(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(PAYLOAD)

    from_file = store.put("audits/a1/inputs/model.pt", source)
    from_bytes = store.put("audits/a1/report.json", b'{"ok": true}', "application/json")

    assert (from_file.size, from_file.sha256) == (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    assert from_bytes.key == "audits/a1/report.json"
    assert store.get_bytes("audits/a1/inputs/model.pt") == PAYLOAD
    assert b"".join(store.open_stream("audits/a1/inputs/model.pt", chunk_size=1000)) == PAYLOAD
    store.download_to("audits/a1/report.json", tmp_path / "out" / "report.json")
    assert (tmp_path / "out" / "report.json").read_bytes() == b'{"ok": true}'


def test_put_overwrites_the_same_key(store: ArtifactStore) -> None:
    store.put("audits/a1/report.json", b"old")
    store.put("audits/a1/report.json", b"new")
    assert store.get_bytes("audits/a1/report.json") == b"new"
    assert store.list("audits/a1/") == ["audits/a1/report.json"]


def test_list_exists_and_delete_prefix_only_touch_one_audit(store: ArtifactStore) -> None:
    for key in ("audits/a1/report.json", "audits/a1/plots/asr.png", "audits/a2/report.json"):
        store.put(key, b"x")

    assert store.list(audit_prefix("a1")) == ["audits/a1/plots/asr.png", "audits/a1/report.json"]
    assert store.delete_prefix(audit_prefix("a1")) == 2

    assert not store.exists("audits/a1/report.json")
    assert store.list() == ["audits/a2/report.json"]


def test_missing_keys_raise_artifact_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("audits/none/report.json")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("audits/none/report.json")
    with pytest.raises(ArtifactNotFound):
        store.download_to("audits/none/report.json", tmp_path / "x")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "audits/../../x", "audits//x", "audits/./x", "a\\b", ""])
def test_unsafe_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x")


def test_delete_prefix_refuses_to_empty_the_whole_store(store: ArtifactStore) -> None:
    with pytest.raises(InvalidKey):
        store.delete_prefix("")


def test_local_store_rejects_symlinks_out_of_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "artifacts")
    (tmp_path / "outside").mkdir()
    (tmp_path / "artifacts" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidKey):
        store.put("link/file", b"x")


def test_local_store_has_no_presigned_urls(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("audits/a1/report.json", b"{}")
    assert store.presigned_url("audits/a1/report.json") is None


def test_presigned_s3_url_serves_the_bytes_without_credentials(s3_store: S3Store) -> None:
    s3_store.put("audits/a1/report.html", b"<h1>report</h1>", "text/html")
    url = s3_store.presigned_url("audits/a1/report.html", expires_s=60)
    assert url is not None
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == b"<h1>report</h1>"
    assert response.headers["Content-Type"] == "text/html"


def test_s3_prefix_isolates_stores_sharing_a_bucket(
    s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials
) -> None:
    tenant = S3Store(s3_store.bucket, "tenant/", endpoint_url=s3_endpoint, credentials=s3_credentials)
    tenant.put("audits/a1/report.json", b"{}")
    s3_store.put("audits/a1/report.json", b"[]")

    assert tenant.list() == ["audits/a1/report.json"]
    assert tenant.get_bytes("audits/a1/report.json") == b"{}"
    assert s3_store.list() == ["audits/a1/report.json", "tenant/audits/a1/report.json"]
