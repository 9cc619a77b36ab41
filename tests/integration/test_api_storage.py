"""The API on the service stack: PostgreSQL and the real S3 (SeaweedFS) store."""

from __future__ import annotations

import requests
from api_support import TINY_SPEC, ApiFactory, api_factory, auth, checkpoint  # noqa: F401 (fixtures)
from sqlalchemy import Engine
from test_api_audits import finish_audit

from auditor.store.artifacts import S3Store


def test_s3_uploads_presigned_downloads_and_deletes(
    pg_engine: Engine, s3_store: S3Store, api_factory: ApiFactory, checkpoint: bytes
) -> None:
    api = api_factory(pg_engine, store=s3_store)
    token = api.token()
    audit = api.submit(token, checkpoint, TINY_SPEC).json
    download = f"{audit['links']['artifacts']}/inputs/model"

    streamed = api.client.get(download, headers=auth(token))
    redirected = api.client.get(download + "?redirect=1", headers=auth(token))
    presigned = requests.get(redirected.headers["Location"], timeout=10)
    finish_audit(api, audit["id"])
    report = api.client.get(audit["links"]["report_json"], headers=auth(token))
    deleted = api.client.delete(audit["links"]["self"], headers=auth(token))

    assert streamed.data == checkpoint
    assert redirected.status_code == 302
    assert presigned.content == checkpoint
    assert report.json["status"] == "succeeded"
    assert deleted.status_code == 204
    assert s3_store.list(f"audits/{audit['id']}/") == []
