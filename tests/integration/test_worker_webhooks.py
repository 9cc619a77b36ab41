"""Completion webhooks: signatures receivers can verify, retries on server errors, the SSRF
guard on every attempt, and the delivery log in PostgreSQL."""

from __future__ import annotations

import json
import time

from sqlalchemy.orm import Session
from worker_support import Receiver, receiver  # noqa: F401 (fixture)

from auditor import webhooks
from auditor.store import audits, users
from auditor.store.webhooks import delivery_count, list_deliveries, record_delivery, webhook_secret_for

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


def test_deliveries_are_recorded_and_signed_with_the_owners_token_secret(pg_session: Session) -> None:
    user = users.create_user(pg_session, "hooks@example.com", "password-123")
    old, _ = users.create_token(pg_session, user.id, "old")
    newest, _ = users.create_token(pg_session, user.id, "new")
    audit, _ = audits.create_audit(pg_session, owner_id=user.id, spec={"effort": "tiny"}, seed=1)

    assert webhook_secret_for(pg_session, audit.id) == newest.webhook_secret
    users.revoke_token(pg_session, newest.id, user.id)
    users.revoke_token(pg_session, old.id, user.id)
    assert webhook_secret_for(pg_session, audit.id) is None  # nothing live to sign with: nothing is sent

    record_delivery(pg_session, audit.id, "http://127.0.0.1/h", 1, 500, "HTTP 500", False)
    record_delivery(pg_session, audit.id, "http://127.0.0.1/h", 2, 200, None, True)
    rows = list_deliveries(pg_session, audit.id)
    assert [(r.attempt, r.status_code, r.succeeded) for r in rows] == [(1, 500, False), (2, 200, True)]
    assert delivery_count(pg_session, audit.id) == 2
    assert json.loads(webhooks.encode_payload({"b": 1, "a": 2})) == {"a": 2, "b": 1}
