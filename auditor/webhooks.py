"""Completion webhooks: signing, verification and delivery behind the SSRF guard.

A webhook URL is chosen by a user but fetched by the worker, which sits next to the
database and the metadata service, so every attempt first resolves and checks the
host (``auditor.blackbox.ssrf``) and then connects to exactly the approved address,
with redirects off: a redirect or a second DNS answer cannot steer the request inside.

Receivers authenticate a delivery by recomputing the HMAC-SHA256 of
``"{timestamp}.{body}"`` with the secret of the token that submitted the audit. The
timestamp is part of the signed message, so an intercepted delivery cannot be replayed
later with a fresh timestamp; receivers reject timestamps outside a tolerance window.

Pure: no database here. The caller records each ``DeliveryAttempt`` (the worker does it
through ``auditor.store.webhooks.record_delivery``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from auditor.blackbox.ssrf import CheckedURL, resolve_and_check
from auditor.errors import AuditError

SIGNATURE_HEADER = "X-Refine-Audit-Signature"
TIMESTAMP_HEADER = "X-Refine-Audit-Timestamp"
EVENT_HEADER = "X-Refine-Audit-Event"
SIGNATURE_SCHEME = "sha256"
DEFAULT_TOLERANCE_S = 300
DEFAULT_BACKOFF_S: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
DEFAULT_TIMEOUT_S = (5.0, 10.0)  # connect, read: a slow receiver must not hold a GPU worker
USER_AGENT = "refine-audit-webhook/1"
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class DeliveryAttempt:
    """The outcome of one POST; ``error`` is set for refusals, connection errors and non-2xx."""

    attempt: int
    status_code: int | None
    error: str | None
    succeeded: bool
    retryable: bool = False


# --- signing --------------------------------------------------------------------------------


def signed_message(body: bytes, timestamp: int) -> bytes:
    return str(int(timestamp)).encode("ascii") + b"." + body


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """Hex HMAC-SHA256 of ``"{timestamp}.{body}"``; the header carries ``sha256=<hex>``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return hmac.new(secret.encode("utf-8"), signed_message(body, ts), hashlib.sha256).hexdigest()


def signature_headers(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """The two headers a receiver needs to verify ``body``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: f"{SIGNATURE_SCHEME}={sign(body, secret, ts)}"}


def verify(
    body: bytes,
    secret: str,
    timestamp: str | int,
    signature: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver runs: constant-time comparison and a freshness window against replays."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    scheme, _, digest = signature.partition("=")
    if scheme != SIGNATURE_SCHEME:
        return False
    return hmac.compare_digest(digest, sign(body, secret, ts))


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Canonical JSON bytes: the exact bytes that are signed are the bytes that are sent."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


# --- delivery -------------------------------------------------------------------------------


def deliver(
    url: str,
    payload: dict[str, Any],
    secret: str,
    allowed_hosts: Iterable[str] = (),
    attempts: int = 5,
    backoff: Sequence[float] = DEFAULT_BACKOFF_S,
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT_S,
    event: str = "audit.finished",
    sleep: Callable[[float], None] = time.sleep,
    on_attempt: Callable[[DeliveryAttempt], None] | None = None,
) -> list[DeliveryAttempt]:
    """POST ``payload`` until a 2xx, a permanent failure, or ``attempts`` run out.

    Retries connection errors, timeouts, 429 and 5xx, sleeping ``backoff[i]`` (the last
    value repeats) between attempts; 3xx and other 4xx are final (the receiver answered
    and will answer the same). Each attempt is re-signed with a fresh timestamp and
    re-checked by the SSRF guard. ``on_attempt`` sees every attempt as it happens, so a
    caller can record it even if a later attempt crashes the process.
    """
    body = encode_payload(payload)
    allowed = tuple(allowed_hosts)
    results: list[DeliveryAttempt] = []
    for number in range(1, max(1, attempts) + 1):
        result = _attempt(number, url, body, secret, allowed, timeout, event)
        results.append(result)
        if on_attempt is not None:
            on_attempt(result)
        if result.succeeded or not result.retryable or number >= attempts:
            break
        sleep(_pause(backoff, number - 1))
    return results


def _pause(backoff: Sequence[float], index: int) -> float:
    if not backoff:
        return 0.0
    return float(backoff[min(index, len(backoff) - 1)])


def _attempt(
    number: int,
    url: str,
    body: bytes,
    secret: str,
    allowed_hosts: tuple[str, ...],
    timeout: float | tuple[float, float],
    event: str,
) -> DeliveryAttempt:
    try:
        target = resolve_and_check(url, allowed_hosts)
    except AuditError as exc:  # refused by the guard: never retried, the answer would not change
        return DeliveryAttempt(number, None, f"{exc.code.value}: {exc.message}", succeeded=False)
    request_url, host_header = pinned_url(target)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Host": host_header,
        EVENT_HEADER: event,
        **signature_headers(body, secret),
    }
    try:
        with _pinned_session(target) as session:
            response = session.post(request_url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
            response.close()  # the receiver's body is of no interest; do not read an unbounded stream
    except requests.RequestException as exc:
        return DeliveryAttempt(number, None, _short(f"{type(exc).__name__}: {exc}"), succeeded=False, retryable=True)
    return _from_status(number, response.status_code)


def _from_status(number: int, status: int) -> DeliveryAttempt:
    if 200 <= status < 300:
        return DeliveryAttempt(number, status, None, succeeded=True)
    retryable = status == 429 or status >= 500
    return DeliveryAttempt(number, status, f"HTTP {status}", succeeded=False, retryable=retryable)


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# --- pinning: connect to the address the guard approved, not to a second DNS answer ---------


class _PinnedTLSAdapter(HTTPAdapter):
    """Connects to an IP but sends SNI for, and verifies the certificate of, the original host."""

    def __init__(self, hostname: str):
        self._hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs.setdefault("server_hostname", self._hostname)
        pool_kwargs.setdefault("assert_hostname", self._hostname)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def pinned_url(target: CheckedURL) -> tuple[str, str]:
    """The URL rewritten to the first approved IP, and the Host header naming the original host."""
    parts = urlsplit(target.url)
    ip = target.addresses[0].split("%", 1)[0]
    ip_netloc = f"[{ip}]" if ":" in ip else ip
    host = f"[{target.host}]" if ":" in target.host else target.host
    default_port = 443 if target.scheme == "https" else 80
    host_header = host if target.port == default_port else f"{host}:{target.port}"
    rewritten = urlunsplit((target.scheme, f"{ip_netloc}:{target.port}", parts.path or "/", parts.query, ""))
    return rewritten, host_header


def _pinned_session(target: CheckedURL) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the approved address is the destination
    session.mount("http://", HTTPAdapter(max_retries=0))
    if target.scheme == "https":
        session.mount("https://", _PinnedTLSAdapter(target.host))
    return session
