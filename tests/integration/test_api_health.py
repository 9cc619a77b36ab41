"""GET /api/v1/health reports each component; 200 only when all of them answer."""

from __future__ import annotations

from api_support import Api, ApiFactory, api_factory, sqlite_api  # noqa: F401 (fixtures)
from sqlalchemy import Engine

from auditor.store.artifacts import S3Store

REDIS_URL = "redis://127.0.0.1:6379/15"


def test_embedded_defaults_are_healthy_without_a_token(sqlite_api: Api) -> None:
    response = sqlite_api.client.get("/api/v1/health")

    assert response.status_code == 200
    assert response.json["status"] == "ok"
    assert response.json["components"] == {
        "database": {"status": "ok", "detail": "sqlite"},
        "broker": {"status": "ok", "detail": "in-process"},
        "store": {"status": "ok", "detail": "LocalStore"},
    }
    assert sqlite_api.store.list() == []  # the probe object is gone


def test_service_mode_checks_postgresql_redis_and_s3(pg_engine: Engine, s3_store: S3Store, api_factory: ApiFactory) -> None:
    api = api_factory(pg_engine, store=s3_store, REFINE_AUDIT_BROKER_URL=REDIS_URL)

    response = api.client.get("/api/v1/health")

    assert response.status_code == 200, response.json
    details = {name: c["detail"] for name, c in response.json["components"].items()}
    assert details == {"database": "postgresql", "broker": "redis", "store": "S3Store"}
    assert s3_store.list() == []


def test_an_unreachable_broker_makes_the_service_degraded(sqlite_engine: Engine, api_factory: ApiFactory) -> None:
    api = api_factory(sqlite_engine, REFINE_AUDIT_BROKER_URL="redis://127.0.0.1:1/0")

    response = api.client.get("/api/v1/health")

    assert response.status_code == 503
    components = response.json["components"]
    assert response.json["status"] == "degraded"
    assert components["broker"]["status"] == "error" and "127.0.0.1" not in components["broker"]["detail"]
    assert components["database"]["status"] == components["store"]["status"] == "ok"
