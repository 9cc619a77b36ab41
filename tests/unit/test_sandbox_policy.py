"""Which runner a process gets: production never runs submitted models unsandboxed without the
operator's exact, loudly named consent; elsewhere an unsandboxed run is announced."""

from __future__ import annotations

from dataclasses import replace

import pytest

from auditor.pipeline import run_audit
from auditor.sandbox import SandboxUnavailable, audit_runner, policy_from_settings, sandbox_policy, sandbox_problem
from auditor.settings import UNSAFE_NO_SANDBOX_CONSENT, Settings, SettingsError

KEY = "k" * 40


def settings(**env: str) -> Settings:
    return Settings.from_env({"REFINE_AUDIT_SECRET_KEY": KEY, **env})


def test_consent_must_be_the_exact_phrase() -> None:
    assert settings().unsafe_no_sandbox is False
    assert settings(REFINE_AUDIT_UNSAFE_NO_SANDBOX=UNSAFE_NO_SANDBOX_CONSENT).unsafe_no_sandbox is True
    for value in ("1", "true", "yes"):
        with pytest.raises(SettingsError, match="REFINE_AUDIT_UNSAFE_NO_SANDBOX"):
            settings(REFINE_AUDIT_UNSAFE_NO_SANDBOX=value)
    with pytest.raises(SettingsError, match="REFINE_AUDIT_SANDBOX"):
        settings(REFINE_AUDIT_SANDBOX="docker")


def test_limits_come_from_the_settings() -> None:
    policy = policy_from_settings(settings(REFINE_AUDIT_SANDBOX_MEMORY_MB="2048", REFINE_AUDIT_AUDIT_TIME_LIMIT_S="600",
                                           OMP_NUM_THREADS="1"))
    assert (policy.memory_bytes, policy.cpu_seconds, policy.wall_seconds) == (2048 << 20, 1200, 600)
    assert policy.thread_env == (("OMP_NUM_THREADS", "1"),)


def test_production_without_a_sandbox_refuses_to_start_unless_consented() -> None:
    warnings: list[str] = []
    production = settings(REFINE_AUDIT_ENV="production", REFINE_AUDIT_SANDBOX="none")
    with pytest.raises(SandboxUnavailable, match="REFINE_AUDIT_UNSAFE_NO_SANDBOX"):
        sandbox_policy(production, warnings.append)
    consented = settings(REFINE_AUDIT_ENV="production", REFINE_AUDIT_SANDBOX="none",
                         REFINE_AUDIT_UNSAFE_NO_SANDBOX=UNSAFE_NO_SANDBOX_CONSENT)
    assert audit_runner(consented, warnings.append).__wrapped__ is run_audit  # MLflow references fetched around it
    assert "UNSANDBOXED" in warnings[0]


def test_a_missing_bwrap_is_named() -> None:
    policy = replace(policy_from_settings(settings()), bwrap="/nonexistent/bwrap")
    assert "not installed" in sandbox_problem(policy)


def test_production_serve_refuses_to_run_audits_in_process_without_the_sandbox(tmp_path) -> None:
    from auditor.store.artifacts import store_from_url
    from web.cli import build_queue

    env = {"REFINE_AUDIT_ENV": "production", "REFINE_AUDIT_SANDBOX": "none",
           "REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    production = settings(**env)
    with pytest.raises(SandboxUnavailable):
        build_queue(production, store_from_url(production.artifacts_url, production))


def test_production_web_app_with_a_broker_needs_no_sandbox_because_it_never_runs_a_model(tmp_path) -> None:
    """In distributed mode the web process only checks containers; the workers run models."""
    from web import create_app

    env = {"REFINE_AUDIT_ENV": "production", "REFINE_AUDIT_SANDBOX": "none", "REFINE_AUDIT_BROKER_URL": "redis://127.0.0.1:1/0",
           "REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    app = create_app(settings(**env))
    assert app.test_client().get("/api/v1/openapi.json").status_code == 200


def test_the_child_reports_memory_exhaustion_as_a_sandbox_limit() -> None:
    from auditor.sandbox.child import _error_of

    assert _error_of(MemoryError())["code"] == "sandbox_limit_exceeded"
    assert _error_of(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))["code"] == "sandbox_limit_exceeded"
    assert _error_of(ValueError("bug"))["code"] == "internal_error"
