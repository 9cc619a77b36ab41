"""Webhook bookkeeping: the signing secret of an audit and the log of delivery attempts.

``auditor.webhooks`` signs and sends without touching the database; these functions
are the worker's side of it. Like ``audits``, they flush but never commit.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from auditor.store.audits import get_audit
from auditor.store.models import ApiToken, WebhookDelivery, utcnow


def webhook_secret_for(session: Session, audit_id: str) -> str | None:
    """The HMAC key for an audit's webhook: the owner's newest live API token's secret.

    Audits do not record which token submitted them, so the owner's newest unrevoked
    token stands in for "the submitting token" (receivers are told to use that one).
    None when the owner has no live token (e.g. a portal-only user): nothing to sign
    with, so nothing is sent.
    """
    owner_id = get_audit(session, audit_id).owner_id
    query = (
        select(ApiToken.webhook_secret)
        .where(ApiToken.user_id == owner_id, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


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


def delivery_count(session: Session, audit_id: str) -> int:
    """How many attempts were recorded; a redelivered task uses it to avoid sending twice."""
    query = select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.audit_id == audit_id)
    return session.scalar(query) or 0


def list_deliveries(session: Session, audit_id: str) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.audit_id == audit_id).order_by(WebhookDelivery.id)
    return list(session.scalars(query))
