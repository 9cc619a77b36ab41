"""Delivering the completion webhooks audits owe (``webhook_outbox``), one attempt at a time.

Whoever ends an audit posts its webhook right away (``deliver_webhook``); the periodic
sweep (``deliver_due_webhooks``) picks up what is left: webhooks whose receiver failed
and are due again, and those of audits ended where nobody delivers (an audit cancelled
while still queued, which the web process records; a worker that died after committing
the final status). Each attempt leases the outbox row first, so two processes never
post the same webhook at once, and a delivered webhook is never posted again. A crash
between a successful POST and recording it is the one case that repeats a delivery;
receivers deduplicate on ``audit_id``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from auditor.store.audits import get_audit
from auditor.store.db import session_scope
from auditor.store.lifecycle import AuditStatus
from auditor.store.models import utcnow
from auditor.store.webhooks import claim_webhook, due_webhooks, settle_webhook, signing_secret
from auditor.webhooks import DeliveryAttempt, deliver

log = logging.getLogger(__name__)

NO_SECRET = "not signed, not sent: the audit was submitted without an API token, so there is no secret to sign with"


@dataclass(frozen=True)
class WebhookPolicy:
    """How long a webhook is retried: 8 attempts over about 2.7 hours by default, spread out for a receiver that is down."""

    max_attempts: int = 8
    backoff_s: tuple[float, ...] = (10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 3600.0)  # after attempt 1, 2, ...
    lease_s: float = 120.0  # longer than one attempt (connect + read timeouts)

    def retry_at(self, attempts_made: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts_made`` failures; None once they are spent."""
        if attempts_made >= self.max_attempts:
            return None
        pause = self.backoff_s[min(attempts_made - 1, len(self.backoff_s) - 1)] if self.backoff_s else 0.0
        return now + timedelta(seconds=pause)


def completion_payload(audit: Any) -> dict[str, Any]:
    """What a webhook receiver gets: enough to act without a second request."""
    error = {"code": audit.error_code, "message": audit.error_message} if audit.error_code else None
    return {
        "event": "audit.finished",
        "audit_id": audit.id,
        "status": AuditStatus(audit.status).value,
        "summary": audit.summary,
        "error": error,
        "finished_at": (audit.finished_at or utcnow()).isoformat(),
        "links": {"self": f"/api/v1/audits/{audit.id}", "report": f"/api/v1/audits/{audit.id}/report.json"},
    }


def deliver_webhook(
    sessions: sessionmaker[Session], audit_id: str, allowed_hosts: Iterable[str], policy: WebhookPolicy
) -> DeliveryAttempt | None:
    """One attempt at the audit's webhook if it is due and free; None when there was nothing to do."""
    with session_scope(sessions) as session:
        debt = claim_webhook(session, audit_id, timedelta(seconds=policy.lease_s))
        if debt is None:
            return None
        url, number = debt.url, debt.attempts + 1
        secret = signing_secret(session, audit_id)
        payload = completion_payload(get_audit(session, audit_id))
    if secret is None:
        attempt = DeliveryAttempt(number, None, NO_SECRET, succeeded=False, retryable=False)
    else:
        (attempt,) = deliver(url, payload, secret, allowed_hosts, attempts=1)
        attempt = dataclasses.replace(attempt, attempt=number)
    retry_at = policy.retry_at(number, utcnow()) if attempt.retryable else None
    with session_scope(sessions) as session:
        settle_webhook(session, audit_id, status_code=attempt.status_code, error=attempt.error,
                       succeeded=attempt.succeeded, retry_at=retry_at)
    _log(audit_id, url, attempt, retry_at)
    return attempt


def deliver_due_webhooks(sessions: sessionmaker[Session], allowed_hosts: Iterable[str], policy: WebhookPolicy) -> int:
    """Attempt every due webhook once; returns how many were delivered."""
    with session_scope(sessions) as session:
        due = due_webhooks(session)
    delivered = 0
    for audit_id in due:
        attempt = deliver_webhook(sessions, audit_id, allowed_hosts, policy)
        delivered += bool(attempt and attempt.succeeded)
    return delivered


def _log(audit_id: str, url: str, attempt: DeliveryAttempt, retry_at: datetime | None) -> None:
    if attempt.succeeded:
        log.info("audit %s: webhook delivered to %s (attempt %d)", audit_id, url, attempt.attempt)
    elif retry_at is not None:
        log.warning("audit %s: webhook attempt %d to %s failed (%s); next at %s", audit_id, attempt.attempt, url,
                    attempt.error, retry_at.isoformat(timespec="seconds"))
    else:
        log.warning("audit %s: webhook to %s given up after attempt %d: %s", audit_id, url, attempt.attempt,
                    attempt.error)
