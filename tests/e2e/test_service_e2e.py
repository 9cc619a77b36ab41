"""The whole service, end to end, as a deployment runs it.

Real processes on the real services of ``scripts/services.sh start``: the web app under
gunicorn (``web.wsgi:app``) and a Celery worker (``refine-audit worker``), both on a
PostgreSQL database, a Redis database and an S3 bucket of their own. The test is only a
client: it creates a user and a token with the ``refine-audit`` CLI, submits a checkpoint
audit and a black-box API audit over HTTP, waits for both to succeed, downloads the
report and the defended model through the API, and then looks behind the API: the
artifacts in the bucket (boto3) and the rows in PostgreSQL (psycopg).

A missing service skips the test on a developer machine and fails it under ``CI=true``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import boto3
import psycopg
import pytest
import requests
import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import make_url

from auditor.blackbox import ModelServer
from auditor.store.artifacts import S3Credentials
from e2e.service_support import (  # noqa: F401 (fixtures)
    EMAIL,
    QUERY_BUDGET,
    SPEC,
    AUDITS_S,
    Service,
    broker_url,
    database_url,
    download,
    fmnist_model,
    service,
    service_extra_env,
    submitted,
    wait_until_ended,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


# --- the test ---------------------------------------------------------------------------------


def test_checkpoint_and_api_audits_through_gunicorn_celery_postgresql_redis_and_s3(
    service: Service, fmnist_model: tuple[torch.nn.Module, Path], s3_endpoint: str, s3_credentials: S3Credentials,
) -> None:
    model, checkpoint = fmnist_model
    started = time.monotonic()
    with ModelServer(model, protocol="v1", labels_only=True) as server:
        checkpoint_id = submitted(requests.post(
            service.api("/audits"), headers=service.headers, timeout=60,
            files={"model": ("model.safetensors", checkpoint.read_bytes(), "application/octet-stream")},
            data={"spec": json.dumps(SPEC)},
        ))
        api_spec = {
            **SPEC,
            "model": {"source": "api", "api": {
                "url": f"{server.url}/v1/models/model:predict", "protocol": "v1", "output": "labels",
                "query_budget": QUERY_BUDGET,
            }},
        }
        api_id = submitted(requests.post(service.api("/audits"), headers=service.headers, json=api_spec, timeout=60))

        ended = wait_until_ended(service, [checkpoint_id, api_id], AUDITS_S)
        served = server.stats()["queries"]
    print(f"both audits succeeded after {time.monotonic() - started:.1f} s")

    # The black-box audit stayed within its budget, and counted exactly what the API answered.
    queries_used = ended[api_id]["summary"]["queries_used"]
    assert 0 < queries_used <= QUERY_BUDGET
    assert queries_used == served, (queries_used, served)
    assert "queries_used" not in ended[checkpoint_id]["summary"]

    # Reports and defended models come back through the API ...
    downloads: dict[tuple[str, str], bytes] = {}
    for audit_id, model_file in ((checkpoint_id, "defended_model.pt"), (api_id, "transform.safetensors")):
        pdf = download(service, f"/audits/{audit_id}/report.pdf")
        assert pdf.startswith(b"%PDF"), pdf[:20]
        downloads[audit_id, "report.pdf"] = pdf
        downloads[audit_id, model_file] = download(service, f"/audits/{audit_id}/artifacts/{model_file}")
        listed = requests.get(service.api(f"/audits/{audit_id}/artifacts"), headers=service.headers, timeout=30).json()
        assert {"report.pdf", "report.json", model_file} <= {a["name"] for a in listed["items"]}
    defended = torch.jit.load(io.BytesIO(downloads[checkpoint_id, "defended_model.pt"]), map_location="cpu")
    with torch.no_grad():
        assert defended(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert load_safetensors(downloads[api_id, "transform.safetensors"])  # a non-empty tensor dict

    # ... and are the very objects in the bucket, under audits/{id}/.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=s3_credentials.access_key_id,
                      aws_secret_access_key=s3_credentials.secret_access_key, region_name="us-east-1")
    for (audit_id, name), content in downloads.items():
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=service.bucket, Prefix=f"audits/{audit_id}/").get("Contents", [])}
        assert f"audits/{audit_id}/{name}" in keys, sorted(keys)
        assert s3.get_object(Bucket=service.bucket, Key=f"audits/{audit_id}/{name}")["Body"].read() == content
    assert s3.head_object(Bucket=service.bucket, Key=f"audits/{checkpoint_id}/inputs/model")["ContentLength"] == (
        checkpoint.stat().st_size
    )

    # The rows the web app and the worker wrote, read straight from PostgreSQL.
    url = make_url(service.database_url)
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    with psycopg.connect(conninfo + (f" password={url.password}" if url.password else "")) as connection:
        rows = connection.execute(
            "SELECT a.id, a.status, a.progress, a.summary, u.email FROM audits a JOIN users u ON u.id = a.owner_id"
            " WHERE a.id = ANY(%s)", [[checkpoint_id, api_id]],
        ).fetchall()
        stored = {row[0]: row for row in rows}
        assert set(stored) == {checkpoint_id, api_id}
        for audit_id, status, progress, summary, email in rows:
            assert (status, progress, email) == ("succeeded", 1.0, EMAIL), stored[audit_id]
            assert summary == ended[audit_id]["summary"]
        artifact_names = {name for (name,) in connection.execute(
            "SELECT name FROM artifacts WHERE audit_id = %s", [api_id]).fetchall()}
        assert {"report.pdf", "transform.safetensors"} <= artifact_names
