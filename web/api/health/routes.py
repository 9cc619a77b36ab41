"""The health route (no token: load balancers and uptime checks call it)."""

from __future__ import annotations

from flask import Blueprint, Response

from web.api.common import reply
from web.api.health import service
from web.api.health.schemas import Health
from web.api.registry import Reply, operation

bp = Blueprint("health", __name__)


@operation(bp, "GET", "/health", summary="Database, broker and store reachability", auth=False,
           replies={200: Reply("Every component answered.", Health),
                    503: Reply("At least one component is down; see components.", Health)})
def health() -> Response:
    report = service.check_all()
    return reply(report, 200 if report.status == "ok" else 503)
