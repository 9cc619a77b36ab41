"""The numbers operators watch, read from the database at scrape time.

The database is the one place every web and worker process writes to, so computing
metrics from it (rather than counting in each process's memory) gives the same answer
whichever gunicorn worker Prometheus happens to reach. Counters here are counts of
rows: deleting an audit lowers them, which Prometheus's ``rate()`` treats as a reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from auditor.store.lifecycle import AuditStatus
from auditor.store.models import Audit, AuditEvent, utcnow


@dataclass(frozen=True)
class StageTotals:
    """Completed stages of one name: how many, and their seconds added up."""

    count: int
    seconds: float


def audits_by_status(session: Session) -> dict[str, int]:
    """Every status with its number of audits (zero included, so series never vanish)."""
    counts = {status.value: 0 for status in AuditStatus}
    for status, count in session.execute(select(Audit.status, func.count()).group_by(Audit.status)):
        counts[AuditStatus(status).value] = int(count)
    return counts


def api_queries_used(session: Session) -> int:
    """Images sent to model APIs by audits that ended with a summary (the audits' own count)."""
    total = session.scalar(select(func.sum(Audit.summary["queries_used"].as_integer())))
    return int(total or 0)


def heartbeat_ages(session: Session, now: datetime | None = None) -> dict[str, float]:
    """Seconds since the newest heartbeat of each running audit: a growing age is a worker in trouble."""
    now = now or utcnow()
    rows = session.execute(select(Audit.id, Audit.heartbeat_at, Audit.started_at).where(Audit.status == AuditStatus.RUNNING))
    return {audit_id: max(0.0, (now - (beat or started or now)).total_seconds()) for audit_id, beat, started in rows}


def stage_totals(session: Session) -> dict[str, StageTotals]:
    """How long completed stages took: each stage event lasts until the audit's next stage or status event.

    One aggregate query with a window function, so the work stays in the database.
    """
    ordered = select(
        AuditEvent.kind, AuditEvent.stage, AuditEvent.at,
        func.lead(AuditEvent.at).over(partition_by=AuditEvent.audit_id, order_by=AuditEvent.id).label("next_at"),
    ).where(AuditEvent.kind.in_(("stage", "status"))).subquery()
    seconds = _seconds_between(session, ordered.c.at, ordered.c.next_at)
    query = (
        select(ordered.c.stage, func.count(), func.sum(seconds))
        .where(ordered.c.kind == "stage", ordered.c.next_at.is_not(None), ordered.c.stage.is_not(None))
        .group_by(ordered.c.stage)
    )
    return {stage: StageTotals(int(count), float(total or 0.0)) for stage, count, total in session.execute(query)}


def _seconds_between(session: Session, start, end):  # noqa: ANN001, ANN202 - SQL expressions
    """``end - start`` in seconds, in the dialect at hand (PostgreSQL intervals, SQLite Julian days)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return cast((func.julianday(end) - func.julianday(start)) * 86400.0, Float)
