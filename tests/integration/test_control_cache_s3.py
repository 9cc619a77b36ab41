"""Positive controls reused across audits of the service: the worker's executor, the bubblewrap sandbox
(no network inside: the executor fetches the cached controls from SeaweedFS before the run and
publishes new ones after it), PostgreSQL rows, and a tampered S3 object that must not be trusted."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from shared_fixtures import service_missing
from sqlalchemy.orm import Session, sessionmaker
from worker_support import FAST_OPTIONS, load, new_owner, sessions, settings_for, submit, tiny_checkpoint  # noqa: F401

from auditor.pipeline import cache as cc
from auditor.sandbox import policy_from_settings, sandbox_problem
from auditor.sandbox.launcher import run_audit_sandboxed
from auditor.settings import Settings
from auditor.store.artifacts import S3Credentials, S3Store, artifact_key
from auditor.store.control_cache import ControlCacheSync
from auditor.store.lifecycle import AuditStatus
from worker.executor import execute_audit

SPEC: dict[str, Any] = {"effort": "tiny", "data": {"train_size": 300, "test_size": 100},
                        "controls": {"attacks": ["badnets"]}, "probes": {"images": 20}}


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials) -> Settings:
    return settings_for(tmp_path, pg_url, s3_store, s3_endpoint, s3_credentials, REFINE_AUDIT_HEARTBEAT_TIMEOUT_S="60",
                        REFINE_AUDIT_AUDIT_TIME_LIMIT_S="600", OMP_NUM_THREADS="1")


@pytest.fixture
def sandboxed(settings: Settings) -> Any:
    policy = policy_from_settings(settings)
    problem = sandbox_problem(policy)
    if problem is not None:
        service_missing(f"the bubblewrap sandbox does not work here: {problem}", hint="install bubblewrap")
    return functools.partial(run_audit_sandboxed, policy=policy)


def test_sandboxed_audits_share_controls_through_s3_and_a_tampered_object_is_discarded(
        tmp_path: Path, settings: Settings, s3_store: S3Store, sessions: sessionmaker[Session], sandboxed: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    owner = new_owner(sessions)
    model = tiny_checkpoint(tmp_path / "model.safetensors")

    def audit() -> tuple[str, dict[str, Any]]:
        audit_id = submit(sessions, s3_store, owner, SPEC, model)
        started = time.monotonic()
        execute_audit(audit_id, settings, store=s3_store, session_factory=sessions, options=FAST_OPTIONS,
                      runner=sandboxed)
        print(f"sandboxed audit took {time.monotonic() - started:.1f} s")
        row = load(sessions, audit_id)
        assert row.status == AuditStatus.SUCCEEDED, (row.error_code, row.error_message)
        report = json.loads(s3_store.get_bytes(artifact_key(audit_id, "report.json")))
        (control,) = report["positive_controls"]
        return audit_id, control

    first_id, first = audit()
    assert first["origin"] == "trained" and first["train_seconds"] > 0
    key = first["cache"]["key"]
    model_key = f"{cc.STORE_PREFIX}{key}/model.safetensors"
    assert s3_store.exists(model_key) and s3_store.exists(f"{cc.STORE_PREFIX}{first['cache']['refine_key']}/manifest.json")

    _, second = audit()
    assert second["origin"] == "reused" and second["cache"]["refine_origin"] == "reused"
    assert second["cache"]["key"] == key and second["cache"]["created_by"] == first_id
    assert second["train_seconds"] == 0.0 and second["refine_seconds"] == 0.0  # no training ran in the sandbox

    # A truncated object behind the manifest's back: the executor's fetch finds it, logs it and deletes it
    # from the store, so the next audit trains that control again (tests/unit/test_control_cache.py runs that
    # audit; two sandboxed audits are what this suite affords on two shared cores).
    s3_store.put(model_key, s3_store.get_bytes(model_key)[:-100])
    sync = ControlCacheSync(s3_store, tmp_path / "fetched", "next")
    with caplog.at_level(logging.WARNING, logger="auditor.store.control_cache"):
        fetched = sync.fetch([key.split("/")[0]])
    assert f"control cache entry {key} failed verification" in caplog.text and "truncated" in caplog.text
    assert key not in fetched and not (tmp_path / "fetched" / key).exists()
    assert not s3_store.list(f"{cc.STORE_PREFIX}{key}/")  # discarded, to be rebuilt
    assert fetched == [first["cache"]["refine_key"]]  # its sibling REFINE entry is sound, but never used alone
