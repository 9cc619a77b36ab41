"""Settings parsing (fail fast, naming the variable) and building the artifact store from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.settings import VARIABLES, Settings, SettingsError
from auditor.store.artifacts import LocalStore, S3Credentials, S3Store, store_from_url


def test_defaults_put_everything_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path}/refine-audit.db"
    assert settings.artifacts_url == f"file://{tmp_path}/artifacts"
    assert settings.broker_url is None and settings.device == "auto" and settings.max_upload_mb == 512
    assert (settings.audit_time_limit_s, settings.heartbeat_timeout_s) == (6 * 3600, 300)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REFINE_AUDIT_DEVICE", "tpu"),
        ("REFINE_AUDIT_MAX_UPLOAD_MB", "lots"),
        ("REFINE_AUDIT_HEARTBEAT_TIMEOUT_S", "0"),
        ("REFINE_AUDIT_DATABASE_URL", "mysql://db/x"),
        ("REFINE_AUDIT_ARTIFACTS", "s3://"),
        ("REFINE_AUDIT_BROKER_URL", "amqp://rabbit"),
        ("S3_ENDPOINT_URL", "127.0.0.1:8333"),
        ("REFINE_AUDIT_ENV", "staging"),
        ("REFINE_AUDIT_SWEEP_INTERVAL_S", "0"),
        ("REFINE_AUDIT_LOST_WORKER_RETRIES", "-1"),
        ("REFINE_AUDIT_TASK_MAX_RETRIES", "three"),
        ("REFINE_AUDIT_VISIBILITY_TIMEOUT_S", "0"),
        ("REFINE_AUDIT_RESULT_BACKEND", "localhost"),
    ],
)
def test_bad_values_fail_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_worker_timings_have_defaults_and_the_visibility_timeout_outlasts_the_time_limit() -> None:
    settings = Settings.from_env({})
    assert (settings.lost_worker_retries, settings.sweep_interval_s, settings.republish_after_s) == (1, 30, 300)
    assert (settings.task_max_retries, settings.result_backend) == (3, None)
    assert settings.visibility_timeout_s > settings.hard_time_limit_s > settings.audit_time_limit_s
    assert Settings.from_env({"REFINE_AUDIT_AUDIT_TIME_LIMIT_S": "60"}).visibility_timeout_s == 60 + 720
    assert Settings.from_env({"REFINE_AUDIT_VISIBILITY_TIMEOUT_S": "8"}).visibility_timeout_s == 8
    assert Settings.from_env({"REFINE_AUDIT_LOST_WORKER_RETRIES": "0"}).lost_worker_retries == 0


def test_production_requires_a_secret_key_and_hides_it() -> None:
    with pytest.raises(SettingsError, match="REFINE_AUDIT_SECRET_KEY"):
        Settings.from_env({"REFINE_AUDIT_ENV": "production"})
    key = "k" * 40
    settings = Settings.from_env({"REFINE_AUDIT_ENV": "production", "REFINE_AUDIT_SECRET_KEY": key})
    assert settings.secret_key == key and key not in repr(settings)


def test_allowed_hosts_are_a_normalised_list() -> None:
    settings = Settings.from_env({"REFINE_AUDIT_ALLOWED_HOSTS": " LocalHost, 127.0.0.1,,"})
    assert settings.allowed_hosts == ("localhost", "127.0.0.1")


def test_describe_lists_every_variable() -> None:
    table = Settings.describe()
    assert all(f"`{variable.name}`" in table for variable in VARIABLES)


def test_file_url_builds_a_local_store(tmp_path: Path) -> None:
    settings = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path)})
    store = store_from_url(settings.artifacts_url, settings)
    assert isinstance(store, LocalStore) and store.root == tmp_path / "artifacts"


def test_s3_url_builds_an_s3_store_and_creates_its_bucket(s3_endpoint: str, s3_credentials: S3Credentials) -> None:
    env = {
        "REFINE_AUDIT_ARTIFACTS": "s3://refine-audit-settings-test/prod",
        "S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": s3_credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3_credentials.secret_access_key,
    }
    settings = Settings.from_env(env)
    store = store_from_url(settings.artifacts_url, settings)
    assert isinstance(store, S3Store) and store.prefix == "prod/"
    try:
        info = store.put("audits/a1/report.json", b"{}")
        head = store.client.head_object(Bucket=store.bucket, Key="prod/audits/a1/report.json")
        assert head["ContentLength"] == info.size
    finally:
        store.delete_prefix("audits/")
        store.client.delete_bucket(Bucket=store.bucket)
