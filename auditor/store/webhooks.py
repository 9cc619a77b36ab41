"""Webhook bookkeeping: the outbox of webhooks owed, their signing secret and the delivery log.

``auditor.webhooks`` signs and sends without touching the database; these functions
are the deliverers' side of it (``worker.notify``). An audit owes its completion webhook
from the transaction that ends it (``owe_webhook``, called by ``audits``), so the debt
survives any crash; deliverers lease the row before posting, so two processes never
post it at once. Like ``audits``, they flush but never commit.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from auditor.store.models import ApiToken, Audit, WebhookDelivery, WebhookOutbox, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def owe_webhook(session: Session, audit: Audit) -> WebhookOutbox | None:
    """Record the completion webhook of an audit that just ended, if it asked for one."""
    url = (audit.spec or {}).get("callback_url")
    if not url:
        return None
    debt = WebhookOutbox(audit_id=audit.id, url=str(url), state=PENDING, attempts=0, next_attempt_at=utcnow())
    session.add(debt)
    session.flush()
    return debt


def signing_secret(session: Session, audit_id: str) -> str | None:
    """The webhook secret of the token that submitted the audit.

    A revoked token still signs the audits it submitted: revoking stops it from calling
    the API, while receivers keep verifying with the secret they were given. None when
    the audit was not submitted with a token (the portal), so there is nothing to sign with.
    """
    query = select(ApiToken.webhook_secret).join(Audit, Audit.token_id == ApiToken.id).where(Audit.id == audit_id)
    return session.scalars(query).first()


def _claimable(now: datetime) -> ColumnElement[bool]:
    lease_free = or_(WebhookOutbox.lease_until.is_(None), WebhookOutbox.lease_until < now)
    return (WebhookOutbox.state == PENDING) & (WebhookOutbox.next_attempt_at <= now) & lease_free


def due_webhooks(session: Session, *, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Audit ids whose webhook is due and not leased, oldest debt first."""
    query = (
        select(WebhookOutbox.audit_id)
        .where(_claimable(now or utcnow()))
        .order_by(WebhookOutbox.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_webhook(
    session: Session, audit_id: str, lease: timedelta, *, now: datetime | None = None
) -> WebhookOutbox | None:
    """Lease a due webhook for one delivery attempt; None when it is not due or someone else holds it."""
    now = now or utcnow()
    query = (
        select(WebhookOutbox)
        .where(WebhookOutbox.audit_id == audit_id, _claimable(now))
        .with_for_update(skip_locked=True)
    )
    debt = session.scalars(query).one_or_none()
    if debt is not None:
        debt.lease_until = now + lease
    return debt


def settle_webhook(
    session: Session,
    audit_id: str,
    *,
    status_code: int | None,
    error: str | None,
    succeeded: bool,
    retry_at: datetime | None,
) -> WebhookOutbox:
    """Log one attempt and release the lease: delivered, due again at ``retry_at``, or given up."""
    debt = session.get(WebhookOutbox, audit_id, with_for_update=True)
    if debt is None:
        raise LookupError(f"audit {audit_id!r} owes no webhook")
    debt.attempts += 1
    record_delivery(session, audit_id, debt.url, debt.attempts, status_code, error, succeeded)
    debt.lease_until = None
    debt.last_error = error
    if succeeded or retry_at is None:
        debt.state = DELIVERED if succeeded else FAILED
        debt.finished_at = utcnow()
    else:
        debt.next_attempt_at = retry_at
    return debt


def get_outbox(session: Session, audit_id: str) -> WebhookOutbox | None:
    return session.get(WebhookOutbox, audit_id)


def record_delivery(
    session: Session,
    audit_id: str,
    url: str,
    attempt: int,
    status_code: int | None,
    error: str | None,
    succeeded: bool,
) -> WebhookDelivery:
    """One row per attempt, so an operator can see every retry and why it failed."""
    delivery = WebhookDelivery(
        audit_id=audit_id,
        url=url,
        attempt=attempt,
        status_code=status_code,
        error=error,
        succeeded=succeeded,
        delivered_at=utcnow(),
    )
    session.add(delivery)
    session.flush()
    return delivery


def list_deliveries(session: Session, audit_id: str) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.audit_id == audit_id).order_by(WebhookDelivery.id)
    return list(session.scalars(query))
