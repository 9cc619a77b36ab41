"""``/metrics`` on the real databases and Redis: the numbers follow the rows, whichever process scrapes."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from api_support import Api, ApiFactory, api_factory  # noqa: F401 (fixtures)
from shared_fixtures import service_missing
from shared_fixtures import claimed_redis_db

from auditor.store import audits
from auditor.store.db import make_session_factory, session_scope
from auditor.store.models import AuditEvent

REDIS_URL = os.environ.get("REFINE_AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def broker_url():
    with claimed_redis_db(REDIS_URL, service_missing) as url:
        yield url


@pytest.mark.integration
def test_audit_counters_gauges_heartbeats_and_stage_durations_follow_the_database(
    pg_engine: Engine, api_factory: ApiFactory, broker_url: str
) -> None:
    api = api_factory(pg_engine, REFINE_AUDIT_BROKER_URL=broker_url)
    owner, _ = api.new_user()
    sessions = make_session_factory(pg_engine)
    before = scrape(api)

    with session_scope(sessions) as session:
        audit_id = audits.create_audit(session, owner_id=owner, spec={}, seed=0)[0].id
        audits.mark_running(session, audit_id)
        audits.update_progress(session, audit_id, "data", 0.1)
    redis.Redis.from_url(broker_url).rpush("cpu", b"message-1", b"message-2")
    running = scrape(api)

    with session_scope(sessions) as session:
        audits.update_progress(session, audit_id, "load", 0.2)
        stage_events = session.query(AuditEvent).filter_by(audit_id=audit_id, kind="stage").order_by(AuditEvent.id).all()
        stage_events[0].at = stage_events[1].at - timedelta(seconds=12)  # the data stage took 12 s
        audits.mark_succeeded(session, audit_id, {"status": "succeeded", "queries_used": 1234})
    ended = scrape(api)

    assert value(running, "refine_audit_audits", status="running") == value(before, "refine_audit_audits", status="running") + 1
    assert value(running, "refine_audit_audits_submitted_total") == value(before, "refine_audit_audits_submitted_total") + 1
    assert value(running, "refine_audit_queue_depth", queue="cpu") == 2
    assert value(running, "refine_audit_queue_depth", queue="gpu") == 0
    assert 0 <= value(running, "refine_audit_heartbeat_age_seconds", audit_id=audit_id) < 60
    assert value(running, "refine_audit_metrics_up", source="database") == 1
    assert value(running, "refine_audit_metrics_up", source="broker") == 1

    finished = "refine_audit_audits_finished_total"
    assert value(ended, finished, status="succeeded") == value(before, finished, status="succeeded") + 1
    assert value(ended, "refine_audit_audits", status="running") == value(before, "refine_audit_audits", status="running")
    assert ("refine_audit_heartbeat_age_seconds", (("audit_id", audit_id),)) not in ended
    assert value(ended, "refine_audit_api_queries_total") == value(before, "refine_audit_api_queries_total") + 1234
    data_count = "refine_audit_stage_duration_seconds_count"
    assert value(ended, data_count, stage="data") == value(before, data_count, stage="data") + 1
    added = value(ended, "refine_audit_stage_duration_seconds_sum", stage="data") - value(
        before, "refine_audit_stage_duration_seconds_sum", stage="data")
    assert added == pytest.approx(12.0, abs=0.5)


def test_a_broker_that_is_down_is_reported_not_fatal(sqlite_engine: Engine, api_factory: ApiFactory) -> None:
    api = api_factory(sqlite_engine, REFINE_AUDIT_BROKER_URL="redis://127.0.0.1:9/0")
    samples = scrape(api)
    assert value(samples, "refine_audit_metrics_up", source="broker") == 0
    assert value(samples, "refine_audit_metrics_up", source="database") == 1
    assert ("refine_audit_audits", (("status", "queued"),)) in samples
