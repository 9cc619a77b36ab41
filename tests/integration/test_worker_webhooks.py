"""Completion webhooks: signatures receivers can verify, retries on server errors, the SSRF
guard on every attempt, and in PostgreSQL the outbox of webhooks owed (one per ended
audit, leased to one deliverer at a time) and the delivery log."""

from __future__ import annotations

import json
import time
from datetime import timedelta

from sqlalchemy.orm import Session
from worker_support import Receiver, receiver  # noqa: F401 (fixture)

from auditor import webhooks
from auditor.store import audits, users
from auditor.store.models import utcnow
from auditor.store.webhooks import (
    DELIVERED,
    PENDING,
    claim_webhook,
    due_webhooks,
    get_outbox,
    list_deliveries,
    settle_webhook,
    signing_secret,
)

SECRET = "s3cr3t-webhook-key"
LOOPBACK = ("127.0.0.1",)


def test_signature_verifies_and_rejects_tampering_and_replays() -> None:
    body = webhooks.encode_payload({"audit_id": "a", "status": "succeeded"})
    headers = webhooks.signature_headers(body, SECRET, timestamp=1_700_000_000)
    ts, sig = headers[webhooks.TIMESTAMP_HEADER], headers[webhooks.SIGNATURE_HEADER]

    assert sig.startswith("sha256=") and len(sig) == len("sha256=") + 64
    assert webhooks.verify(body, SECRET, ts, sig, now=1_700_000_010)
    assert not webhooks.verify(body + b" ", SECRET, ts, sig, now=1_700_000_010)  # body changed
    assert not webhooks.verify(body, "other-secret", ts, sig, now=1_700_000_010)
    assert not webhooks.verify(body, SECRET, str(int(ts) + 60), sig, now=1_700_000_010)  # timestamp swapped
    assert not webhooks.verify(body, SECRET, ts, sig, now=1_700_000_000 + 3600)  # replayed an hour later


def test_delivery_to_allowlisted_loopback_is_signed(receiver: Receiver) -> None:
    payload = {"event": "audit.finished", "audit_id": "abc", "status": "succeeded"}

    attempts = webhooks.deliver(receiver.url, payload, SECRET, LOOPBACK, attempts=3, backoff=(0.01,))

    assert [(a.attempt, a.status_code, a.succeeded) for a in attempts] == [(1, 200, True)]
    (request,) = receiver.requests
    assert request.json() == payload
    assert webhooks.verify(request.body, SECRET, request.headers[webhooks.TIMESTAMP_HEADER],
                           request.headers[webhooks.SIGNATURE_HEADER])
    assert abs(int(request.headers[webhooks.TIMESTAMP_HEADER]) - time.time()) < 60
    assert request.headers[webhooks.EVENT_HEADER] == "audit.finished"


def test_delivery_retries_server_errors_with_backoff(receiver: Receiver) -> None:
    receiver.statuses = [500, 503, 200]
    pauses: list[float] = []

    attempts = webhooks.deliver(receiver.url, {"n": 1}, SECRET, LOOPBACK, attempts=5, backoff=(0.5, 1.0), sleep=pauses.append)

    assert [(a.status_code, a.succeeded) for a in attempts] == [(500, False), (503, False), (200, True)]
    assert pauses == [0.5, 1.0]
    assert len(receiver.requests) == 3
    # Each attempt is signed afresh and still verifies.
    for request in receiver.requests:
        assert webhooks.verify(request.body, SECRET, request.headers[webhooks.TIMESTAMP_HEADER],
                               request.headers[webhooks.SIGNATURE_HEADER])


def test_delivery_gives_up_after_the_last_attempt(receiver: Receiver) -> None:
    receiver.statuses = [502]
    attempts = webhooks.deliver(receiver.url, {}, SECRET, LOOPBACK, attempts=3, backoff=(0,), sleep=lambda _: None)
    assert [a.status_code for a in attempts] == [502, 502, 502]
    assert not any(a.succeeded for a in attempts)


def test_client_errors_and_redirects_are_final_and_not_followed(receiver: Receiver) -> None:
    receiver.statuses = [302]
    receiver.extra_headers = {"Location": "http://169.254.169.254/latest/meta-data/"}
    attempts = webhooks.deliver(receiver.url, {}, SECRET, LOOPBACK, attempts=5, sleep=lambda _: None)
    assert [(a.status_code, a.succeeded, a.retryable) for a in attempts] == [(302, False, False)]
    assert len(receiver.requests) == 1


def test_private_and_unlisted_loopback_addresses_are_refused_without_a_request(receiver: Receiver) -> None:
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest", receiver.url):
        attempts = webhooks.deliver(url, {}, SECRET, allowed_hosts=(), attempts=5, sleep=lambda _: None)
        assert len(attempts) == 1, url
        assert attempts[0].status_code is None and not attempts[0].succeeded
        assert attempts[0].error.startswith("url_not_allowed"), attempts[0].error
    assert receiver.requests == []


def test_connection_refused_is_retried() -> None:
    attempts = webhooks.deliver("http://127.0.0.1:9/hook", {}, SECRET, LOOPBACK, attempts=2, sleep=lambda _: None,
                                timeout=(1.0, 1.0))
    assert len(attempts) == 2
    assert all(a.status_code is None and a.retryable and "ConnectionError" in a.error for a in attempts)


def test_the_submitting_token_signs_whatever_tokens_come_later(pg_session: Session) -> None:
    user = users.create_user(pg_session, "hooks@example.com", "password-123")
    submitting, _ = users.create_token(pg_session, user.id, "ci")
    audit, _ = audits.create_audit(pg_session, owner_id=user.id, spec={"effort": "tiny"}, seed=1, token_id=submitting.id)
    portal, _ = audits.create_audit(pg_session, owner_id=user.id, spec={"effort": "tiny"}, seed=1)

    users.create_token(pg_session, user.id, "created later, e.g. by a script")
    users.revoke_token(pg_session, submitting.id, user.id)

    assert signing_secret(pg_session, audit.id) == submitting.webhook_secret
    assert signing_secret(pg_session, portal.id) is None


def ended(session: Session, owner_id: int, end: str, callback: str | None = "http://127.0.0.1/h") -> str:
    spec = {"effort": "tiny", **({"callback_url": callback} if callback else {})}
    audit, _ = audits.create_audit(session, owner_id=owner_id, spec=spec, seed=1)
    if end == "cancelled while queued":
        audits.request_cancel(session, audit.id)
        return audit.id
    audits.mark_running(session, audit.id)
    if end == "succeeded":
        audits.mark_succeeded(session, audit.id, {})
    elif end == "failed":
        audits.mark_failed(session, audit.id, "invalid_checkpoint", "no")
    elif end == "worker lost":
        audits.get_audit(session, audit.id).heartbeat_at = utcnow() - timedelta(hours=1)
        audits.reap_stale(session, timedelta(minutes=5), max_retries=0)
    return audit.id


def test_every_terminal_state_owes_one_webhook_in_the_same_transaction(pg_session: Session) -> None:
    user = users.create_user(pg_session, "owed@example.com", "password-123")
    endings = ("succeeded", "failed", "cancelled while queued", "worker lost")

    owed = {end: get_outbox(pg_session, ended(pg_session, user.id, end)) for end in endings}
    silent = get_outbox(pg_session, ended(pg_session, user.id, "succeeded", callback=None))

    assert all(debt is not None and (debt.state, debt.attempts) == (PENDING, 0) for debt in owed.values()), owed
    assert silent is None
    statuses = {end: audits.get_audit(pg_session, debt.audit_id).status.value for end, debt in owed.items()}
    assert statuses == {"succeeded": "succeeded", "failed": "failed", "cancelled while queued": "cancelled",
                        "worker lost": "failed"}


def test_a_webhook_is_leased_to_one_deliverer_retried_when_due_and_never_resent(pg_session: Session) -> None:
    user = users.create_user(pg_session, "lease@example.com", "password-123")
    audit_id = ended(pg_session, user.id, "succeeded")
    lease, now = timedelta(minutes=2), utcnow()

    assert claim_webhook(pg_session, audit_id, lease, now=now) is not None
    assert claim_webhook(pg_session, audit_id, lease, now=now) is None  # leased
    assert due_webhooks(pg_session, now=now) == []
    settle_webhook(pg_session, audit_id, status_code=503, error="HTTP 503", succeeded=False,
                   retry_at=now + timedelta(seconds=30))
    assert claim_webhook(pg_session, audit_id, lease, now=now + timedelta(seconds=10)) is None  # not due yet
    assert due_webhooks(pg_session, now=now + timedelta(seconds=31)) == [audit_id]
    assert claim_webhook(pg_session, audit_id, lease, now=now + timedelta(seconds=31)) is not None
    settle_webhook(pg_session, audit_id, status_code=200, error=None, succeeded=True, retry_at=None)

    assert claim_webhook(pg_session, audit_id, lease, now=now + timedelta(hours=1)) is None  # delivered: never again
    debt = get_outbox(pg_session, audit_id)
    assert (debt.state, debt.attempts, debt.lease_until) == (DELIVERED, 2, None)
    rows = list_deliveries(pg_session, audit_id)
    assert [(r.attempt, r.status_code, r.succeeded) for r in rows] == [(1, 503, False), (2, 200, True)]
    assert json.loads(webhooks.encode_payload({"b": 1, "a": 2})) == {"a": 2, "b": 1}
