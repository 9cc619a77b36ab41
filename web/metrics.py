"""``GET /metrics``: the service's state in the Prometheus text format.

Every number is computed when Prometheus scrapes, from the database and the broker
(``auditor.store.metrics``, Redis), never kept in this process's memory: any of the
gunicorn workers may answer a scrape, and Celery workers run on other machines, yet
all report through here and agree. Workers therefore need no metrics port of their
own. The route needs no token (Prometheus rarely sends one); keep it off the public
ingress, as usual for ``/metrics``.

Series (all prefixed ``refine_audit_``):

* ``audits{status}`` — audits in each status now (gauge);
* ``audits_submitted_total`` and ``audits_finished_total{status}`` — audits ever
  submitted / ended per terminal status, as rows in the database (counters);
* ``queue_depth{queue}`` — audit messages waiting in each broker queue (gauge; Redis only);
* ``stage_duration_seconds{stage}`` — completed stages, ``_count`` and ``_sum`` (summary);
* ``api_queries_total`` — images audits sent to model APIs (counter);
* ``heartbeat_age_seconds{audit_id}`` — age of each running audit's newest heartbeat (gauge);
* ``metrics_up{source}`` — 1 when the database / the broker answered this scrape, else 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from flask import Blueprint, Flask, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from auditor.store import metrics as db_metrics
from auditor.store.db import session_scope
from auditor.store.lifecycle import TERMINAL
from web.context import services

log = logging.getLogger(__name__)

PREFIX = "refine_audit"
QUEUES = ("cpu", "gpu")  # the worker's queues (worker.celery_app.QUEUES; web/ must not import worker/)
#: kombu's Redis transport keeps a queue's priority levels in separate lists: name, name\x06\x163, ...
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
REDIS_TIMEOUT_S = 2.0
REGISTRY_KEY = "refine_audit_metrics"

bp = Blueprint("metrics", __name__)


class ServiceCollector(Collector):
    """Reads the database and the broker on each scrape; a source that fails reports ``metrics_up`` 0.

    ``collect`` runs inside the ``/metrics`` request, so it finds the app's services there.
    """

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_metrics_up", "Whether a metrics source answered this scrape.", labels=["source"])
        for source, produce in (("database", self._database), ("broker", self._broker)):
            try:
                yield from produce()
                up.add_metric([source], 1.0)
            except Exception as exc:  # noqa: BLE001 -- a scrape must answer even when a source is down
                log.warning("metrics from %s failed: %r", source, exc)
                up.add_metric([source], 0.0)
        yield up

    def _database(self) -> list[Metric]:
        with session_scope(services().sessions) as session:
            by_status = db_metrics.audits_by_status(session)
            queries = db_metrics.api_queries_used(session)
            stages = db_metrics.stage_totals(session)
            ages = db_metrics.heartbeat_ages(session)
        audits = GaugeMetricFamily(f"{PREFIX}_audits", "Audits in each status now.", labels=["status"])
        finished = CounterMetricFamily(f"{PREFIX}_audits_finished", "Audits that ended, by final status.", labels=["status"])
        for status, count in by_status.items():
            audits.add_metric([status], count)
            if status in {s.value for s in TERMINAL}:
                finished.add_metric([status], count)
        submitted = CounterMetricFamily(f"{PREFIX}_audits_submitted", "Audits submitted.", value=sum(by_status.values()))
        spent = CounterMetricFamily(f"{PREFIX}_api_queries", "Images audits sent to model APIs.", value=queries)
        durations = SummaryMetricFamily(f"{PREFIX}_stage_duration_seconds", "Completed audit stages.", labels=["stage"])
        for stage, totals in sorted(stages.items()):
            durations.add_metric([stage], count_value=totals.count, sum_value=totals.seconds)
        heartbeats = GaugeMetricFamily(f"{PREFIX}_heartbeat_age_seconds", "Seconds since each running audit's "
                                       "newest heartbeat.", labels=["audit_id"])
        for audit_id, age in sorted(ages.items()):
            heartbeats.add_metric([audit_id], age)
        return [audits, finished, submitted, spent, durations, heartbeats]

    def _broker(self) -> list[Metric]:
        url = services().settings.broker_url
        if url is None or not url.startswith(("redis://", "rediss://")):
            return []  # in-process audits: queued audits are refine_audit_audits{status="queued"}
        client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        try:
            depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Audit messages waiting in each broker queue.",
                                      labels=["queue"])
            for queue in QUEUES:
                depth.add_metric([queue], sum(int(client.llen(queue + suffix)) for suffix in PRIORITY_SUFFIXES))
        finally:
            client.close()
        return [depth]


def install_metrics(app: Flask) -> None:
    """Give ``app`` its own registry (tests build many apps) and the ``/metrics`` route."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector())
    app.extensions[REGISTRY_KEY] = registry
    app.register_blueprint(bp)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(current_app.extensions[REGISTRY_KEY]), content_type=CONTENT_TYPE_LATEST)
