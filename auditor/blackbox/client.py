"""HTTP clients for model APIs: KServe/TF-Serving v1, Open Inference Protocol v2, or a JSON mapping.
(Over 400 lines: three wire protocols share one budget, cache, retry and validation path.)

Every audit of a black-box model spends a real (often paid, often rate-limited)
resource, so the client is where the spending is controlled:

* a hard **query budget** (one query = one image) checked *before* a request is sent;
* a per-audit **cache** keyed by the sha256 of the image bytes, so no image is paid twice;
* **retries** with exponential backoff for 429/5xx/timeouts/connection errors, honouring
  ``Retry-After`` up to a cap, and none for errors that cannot heal (401, 400, bad JSON);
* a **token-bucket rate limit** and a bounded thread pool for concurrency;
* **validation** of every answer (size cap, shape, class count, finite numbers), because a
  wrong answer silently trains a wrong surrogate and produces a wrong report.

Whatever the API returns, ``predict`` gives probabilities (N, K); label-only APIs give
one-hot rows and report ``output_kind == "labels"`` so callers train on hard labels.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import requests
import torch
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from auditor.blackbox.ssrf import CheckedURL, resolve_and_check
from auditor.errors import AuditError, ErrorCode
from auditor.pipeline.plan import DEFAULT_QUERY_BUDGET

log = logging.getLogger(__name__)

WireProtocol = Literal["v1", "v2", "json"]
OutputKind = Literal["auto", "probabilities", "logits", "labels"]
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
PROBABILITY_TOLERANCE = 1e-3  # rows summing to 1 within this are probabilities (float32 JSON round-trips)


@runtime_checkable
class ModelAPI(Protocol):
    """What the pipeline needs from a black-box model: probabilities for [0, 1] images."""

    num_classes: int

    @property
    def output_kind(self) -> str:
        """``probabilities``, ``logits`` (softmaxed by the client) or ``labels`` (one-hot rows)."""
        ...

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], shape (N, C, H, W) -> float probabilities (N, K)."""
        ...

    def counters(self) -> dict[str, float]:
        """Spending so far, for the report."""
        ...


@dataclass(frozen=True)
class ApiConfig:
    """How to talk to one model API; user-supplied, so validated on construction."""

    url: str  # v1: the full ``...:predict`` URL or a base URL; v2: a base URL or the full ``.../infer`` URL
    num_classes: int  # K; every answer is checked against it (label-only answers need it for one-hot rows)
    protocol: WireProtocol = "v1"  # v1 instances/predictions, v2 Open Inference Protocol, json = the template below
    model_name: str = "model"  # fills /v1/models/{name}:predict and /v2/models/{name}/infer for base URLs
    output: OutputKind = "auto"  # auto-detects integer labels / rows summing to 1 / other floats (logits)
    auth_header: str | None = None  # e.g. "Authorization"; its value is a secret, see below
    auth_value: str | None = field(default=None, repr=False)  # the secret itself (never logged, never in repr)
    auth_env: str | None = None  # or: the name of the environment variable holding the secret
    extra_headers: tuple[tuple[str, str], ...] = ()  # non-secret headers sent with every request (a dict is accepted)
    batch_size: int = 64  # images per request; large JSON bodies are slow and servers cap request size
    max_concurrency: int = 2  # requests in flight; 2 cores and polite clients
    rate_limit_per_s: float | None = None  # requests per second (token bucket); None = unlimited
    timeout_s: float = 30.0  # connect timeout and total time to read one answer
    max_retries: int = 3  # extra attempts for 429/5xx/timeouts/connection errors
    backoff_base_s: float = 0.5  # first retry waits this, then doubles
    max_backoff_s: float = 30.0  # cap on any single wait, including a server's Retry-After
    query_budget: int | None = DEFAULT_QUERY_BUDGET  # hard cap on distinct images sent per audit; None = no cap
    input_layout: Literal["nchw", "nhwc"] = "nchw"  # how images are nested in the request
    input_name: str = "input"  # v2 input tensor name
    output_name: str | None = None  # v2 output tensor to read / v1 key when predictions are objects
    json_request_key: str = "inputs"  # json protocol: body is {key: [images]} (dots nest: "data.images")
    json_response_path: str = "outputs"  # json protocol: where the answers are ("result.probs", "0.scores")
    max_response_bytes: int = 32 * 1024 * 1024  # a larger answer is refused (memory safety)
    ca_bundle: str | None = None  # PEM file of CAs to trust for https (private model servers); system CAs otherwise

    def __post_init__(self) -> None:
        if isinstance(self.extra_headers, Mapping):  # keep the frozen config hashable
            object.__setattr__(self, "extra_headers", tuple(sorted(self.extra_headers.items())))
        if self.protocol not in ("v1", "v2", "json"):
            raise ValueError(f"protocol must be v1, v2 or json, not {self.protocol!r}")
        if self.output not in ("auto", "probabilities", "logits", "labels"):
            raise ValueError(f"output must be auto, probabilities, logits or labels, not {self.output!r}")
        if self.input_layout not in ("nchw", "nhwc"):
            raise ValueError("input_layout must be nchw or nhwc")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        positive = {"batch_size": self.batch_size, "max_concurrency": self.max_concurrency,
                    "timeout_s": self.timeout_s, "max_response_bytes": self.max_response_bytes}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_retries < 0 or self.backoff_base_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_retries, backoff_base_s and max_backoff_s must not be negative")
        if self.rate_limit_per_s is not None and self.rate_limit_per_s <= 0:
            raise ValueError("rate_limit_per_s must be positive or None")
        if self.query_budget is not None and self.query_budget < 0:
            raise ValueError("query_budget must not be negative")
        if (self.auth_value or self.auth_env) and not self.auth_header:
            raise ValueError("auth_value/auth_env need auth_header (the header name)")
        if not self.json_request_key or not self.json_response_path:
            raise ValueError("json_request_key and json_response_path must not be empty")

    def endpoint(self) -> str:
        """The URL requests go to: base URLs get the protocol's standard path appended."""
        url = self.url.rstrip("/")
        if self.protocol == "v1" and not url.endswith(":predict"):
            return f"{url}/v1/models/{self.model_name}:predict"
        if self.protocol == "v2" and not url.endswith("/infer"):
            return f"{url}/v2/models/{self.model_name}/infer"
        return url

    def secret_headers(self) -> dict[str, str]:
        """The auth header, read at call time so the secret never sits in a stored spec."""
        if not self.auth_header:
            return {}
        value = self.auth_value
        if value is None and self.auth_env:
            value = os.environ.get(self.auth_env)
            if value is None:
                raise AuditError(
                    ErrorCode.INVALID_SPEC,
                    f"The environment variable {self.auth_env} holding the API credential is not set.",
                    {"variable": self.auth_env},
                )
        return {self.auth_header: value} if value is not None else {}


class TokenBucket:
    """Smooth request rate: ``rate`` tokens per second, bursts of at most ``capacity``.

    The default capacity of one means no bursts at all: providers enforce limits over
    windows we cannot see, so evenly spaced requests are the safe reading of "N per second".
    """

    def __init__(self, rate: float, capacity: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.capacity = capacity
        self._clock, self._sleep = clock, sleep  # a test passes a fake clock whose sleep advances it
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a token is free; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0 - 1e-9:  # a token refilled up to rounding: waiting 1e-17 s would never end
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return waited
                pause = (1.0 - self._tokens) / self.rate
            self._sleep(pause)
            waited += pause


class _PinnedHTTPSAdapter(HTTPAdapter):
    """Connect to a pinned IP while presenting and verifying the original host name over TLS."""

    def __init__(self, server_hostname: str):
        self._server_hostname = server_hostname
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs.setdefault("server_hostname", self._server_hostname)
        pool_kwargs.setdefault("assert_hostname", self._server_hostname)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class _Retryable(Exception):
    """A failure worth another attempt; ``error`` is what to raise when attempts run out."""

    def __init__(self, error: AuditError, retry_after: float | None = None):
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class ApiTransport:
    """JSON over HTTP to one model API endpoint: SSRF-checked and pinned, rate-limited, retried, capped.

    The audit's ``HttpModelAPI`` (which adds the budget, the cache and answer
    interpretation) and the defended endpoint's upstream client share it, so both
    reach exactly the address the SSRF guard approved and fail the same way.
    """

    def __init__(self, config: ApiConfig, allowed_hosts: Sequence[str] = (),
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._sleep = sleep  # waits between retries; tests pass one that records the waits instead
        self.target = resolve_and_check(config.endpoint(), allowed_hosts)
        self._request_url, self._host_header = _pinned_url(self.target)
        self._session = _make_session(self.target)
        self._bucket = TokenBucket(config.rate_limit_per_s) if config.rate_limit_per_s else None
        self._lock = threading.Lock()
        self._counts = {"requests_sent": 0, "retries": 0}

    def counters(self) -> dict[str, int]:
        """``requests_sent`` (HTTP attempts, retries included) and ``retries``."""
        with self._lock:
            return dict(self._counts)

    def post(self, payload: Any) -> Any:
        """POST ``payload`` as JSON and return the parsed answer, retrying what can heal."""
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            if self._bucket is not None:
                self._bucket.acquire()
            try:
                return self._post_once(body)
            except _Retryable as failure:
                if attempt >= self.config.max_retries:
                    raise failure.error from None
                pause = self._backoff(attempt, failure.retry_after)
                log.info("model API attempt %d failed (%s); retrying in %.2fs", attempt + 1, failure.error.code.value, pause)
                with self._lock:
                    self._counts["retries"] += 1
                self._sleep(pause)
                attempt += 1

    def get_status(self, path: str) -> int | None:
        """HTTP status of one GET to ``path`` on the approved address (readiness probes); None if unreachable."""
        url = urlunsplit(urlsplit(self._request_url)._replace(path=path, query=""))
        try:
            response = self._session.get(url, headers=self._headers(), timeout=(self.config.timeout_s,) * 2,
                                         allow_redirects=False, verify=self.config.ca_bundle or True)
            response.close()
        except requests.RequestException:
            return None
        return response.status_code

    def close(self) -> None:
        self._session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "Host": self._host_header}
        headers.update(dict(self.config.extra_headers))
        headers.update(self.config.secret_headers())
        return headers

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff; a server's Retry-After wins when longer, everything capped."""
        pause = self.config.backoff_base_s * (2**attempt)
        if retry_after is not None:
            pause = max(pause, retry_after)
        return min(pause, self.config.max_backoff_s)

    def _post_once(self, body: bytes) -> Any:
        """One HTTP attempt -> parsed JSON; classifies every failure as final or retryable."""
        headers = {"Content-Type": "application/json", **self._headers()}
        with self._lock:
            self._counts["requests_sent"] += 1
        timeout = self.config.timeout_s
        deadline = time.monotonic() + timeout
        try:
            response = self._session.post(
                self._request_url, data=body, headers=headers, timeout=(timeout, timeout),
                stream=True, allow_redirects=False, verify=self.config.ca_bundle or True,
            )
        except requests.exceptions.SSLError as exc:  # a certificate problem does not heal by retrying
            raise _error(ErrorCode.API_UNREACHABLE, "The TLS handshake with the model API failed "
                         "(certificate not trusted or not valid for the host name).", reason="tls") from exc
        except requests.Timeout as exc:
            raise _Retryable(_error(ErrorCode.API_TIMEOUT, f"The model API did not answer within {timeout}s.")) from exc
        except requests.ConnectionError as exc:
            raise _Retryable(_error(ErrorCode.API_UNREACHABLE, "The model API could not be reached.",
                                    reason=type(exc).__name__)) from exc
        with response:
            _raise_for_status(response, self.config)
            raw = _read_capped(response, self.config.max_response_bytes, deadline, timeout)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _error(ErrorCode.API_BAD_RESPONSE, "The model API answered with something that is not JSON.") from exc


def image_key(image: torch.Tensor) -> str:
    """sha256 of one image's float32 bytes and shape: the cache key (identical pixels = same key)."""
    data = image.detach().to(torch.float32).contiguous().cpu()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class HttpModelAPI:
    """A ``ModelAPI`` over HTTP. Thread-safe; use one instance per audit (the cache and budget are per audit).

    Construction runs the SSRF guard and pins the approved address, so no request can
    reach an address the guard did not see. ``allowed_hosts`` is the operator's allowlist
    (``Settings.allowed_hosts``) plus any caller exception (tests pass ``("127.0.0.1",)``).
    ``sleep`` waits between retries; tests pass one that records the waits instead.
    """

    def __init__(self, config: ApiConfig, *, allowed_hosts: Sequence[str] = (),
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.num_classes = config.num_classes
        self._transport = ApiTransport(config, allowed_hosts, sleep=sleep)
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="model-api")
        self._lock = threading.Lock()  # guards counters and the cache (worker threads write them)
        self._call_lock = threading.Lock()  # one predict at a time: exact budget and no duplicate in-flight images
        self._cache: dict[str, torch.Tensor] = {}
        self._charged: set[str] = set()  # every image ever sent, answered or not: never charged twice
        self._detected: str | None = None if config.output == "auto" else config.output
        self._counts = {"queries_used": 0, "cache_hits": 0}
        self._seconds = 0.0

    # -- public -------------------------------------------------------------------------------------------------

    @property
    def output_kind(self) -> str:
        """The kind of answers seen (or configured); ``unknown`` before the first answer in auto mode."""
        return self._detected or "unknown"

    @property
    def queries_used(self) -> int:
        return self._counts["queries_used"]

    @property
    def remaining_budget(self) -> int | None:
        budget = self.config.query_budget
        return None if budget is None else budget - self.queries_used

    def counters(self) -> dict[str, float]:
        """``queries_used`` (distinct images sent), ``requests_sent`` (HTTP attempts, retries included),
        ``cache_hits`` (images answered from the cache), ``retries`` and ``seconds_spent`` (wall time in predict)."""
        with self._lock:
            return {**self._counts, **self._transport.counters(), "seconds_spent": round(self._seconds, 3)}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K) for float images in [0, 1] (N, C, H, W), in input order."""
        x = _check_images(x)
        started = time.monotonic()
        try:
            with self._call_lock:
                return self._predict(x)
        finally:
            with self._lock:
                self._seconds += time.monotonic() - started

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._transport.close()

    def __enter__(self) -> "HttpModelAPI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        target = self._transport.target
        return f"HttpModelAPI({self.config.protocol}, {target.host}:{target.port}, K={self.num_classes})"

    # -- batching, cache and budget ------------------------------------------------------------------------------

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        keys = [image_key(img) for img in x]
        to_send = self._reserve(keys)
        chunks = [to_send[i : i + self.config.batch_size] for i in range(0, len(to_send), self.config.batch_size)]
        futures = [self._pool.submit(self._answer_chunk, x[[idx for idx, _ in chunk]]) for chunk in chunks]
        failures: list[BaseException] = []
        for chunk, future in zip(chunks, futures):
            error = future.exception()
            if error is not None:
                failures.append(error)
                continue
            with self._lock:  # keep every answer already paid for, even if another chunk failed
                for (_, key), row in zip(chunk, future.result()):
                    self._cache[key] = row
        if failures:
            raise failures[0]
        with self._lock:
            if not keys:
                return torch.empty(0, self.num_classes)
            return torch.stack([self._cache[key] for key in keys])

    def _reserve(self, keys: list[str]) -> list[tuple[int, str]]:
        """Pick the images that need sending (first occurrence of each uncached key) and charge the budget.

        All or nothing: if the new images do not fit the remaining budget, nothing is sent
        and ``query_budget_exhausted`` is raised, so a call never half-spends. An image
        whose request failed stays charged (the API may have processed it, and the budget
        is a promise about what we send) but is not charged again when it is re-sent.
        """
        with self._lock:
            first: dict[str, int] = {}
            for index, key in enumerate(keys):
                if key not in self._cache and key not in first:
                    first[key] = index
            new = [key for key in first if key not in self._charged]
            budget = self.config.query_budget
            if budget is not None and self._counts["queries_used"] + len(new) > budget:
                raise AuditError(
                    ErrorCode.QUERY_BUDGET_EXHAUSTED,
                    f"Sending {len(new)} more images would exceed the query budget of {budget} "
                    f"({self._counts['queries_used']} already used).",
                    {"budget": budget, "used": self._counts["queries_used"], "requested": len(new)},
                )
            self._charged.update(new)
            self._counts["queries_used"] += len(new)
            self._counts["cache_hits"] += len(keys) - len(first)
            return [(index, key) for key, index in first.items()]

    # -- one request --------------------------------------------------------------------------------------------

    def _answer_chunk(self, x: torch.Tensor) -> torch.Tensor:
        payload = self._transport.post(encode_request(self.config, x))
        return self._to_probabilities(decode_response(self.config, payload, len(x)), len(x))

    # -- interpreting answers ------------------------------------------------------------------------------------

    def _to_probabilities(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Validate the decoded answer and turn it into probability rows (one-hot for labels)."""
        with self._lock:
            kind = self._detected or detect_output_kind(values)
        if kind == "labels":
            probs = torch.nn.functional.one_hot(_as_labels(values, n, self.num_classes), self.num_classes).float()
        else:
            rows = _as_score_rows(values, n, self.num_classes)
            if kind == "logits":
                probs = torch.softmax(rows.double(), dim=1).float()
            elif _rows_are_probabilities(rows, tolerance=10 * PROBABILITY_TOLERANCE):
                probs = (rows.clamp_min(0) / rows.clamp_min(0).sum(1, keepdim=True)).float()
            else:
                raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's probabilities are not in [0, 1] or do not sum to 1.")
        self._remember_kind(kind)
        return probs

    def _remember_kind(self, kind: str) -> None:
        """In auto mode the first valid answer fixes the kind for the whole audit (consistent targets)."""
        with self._lock:
            if self._detected is None:
                self._detected = kind
                log.info("model API answers look like %s", kind)


def detect_output_kind(values: torch.Tensor) -> str:
    """``labels`` for integer vectors (N,) or (N, 1); ``probabilities`` for rows in [0, 1] summing to 1; else ``logits``."""
    integral = not values.is_floating_point() or bool(torch.all(values == values.round()))
    if values.dim() == 1 or (values.dim() == 2 and values.shape[1] == 1):
        return "labels" if integral else "logits"
    if values.dim() == 2 and _rows_are_probabilities(values, tolerance=PROBABILITY_TOLERANCE):
        return "probabilities"
    return "logits"


def _rows_are_probabilities(rows: torch.Tensor, tolerance: float) -> bool:
    rows = rows.double()
    in_range = bool(torch.all((rows >= -tolerance) & (rows <= 1 + tolerance)))
    return in_range and bool(torch.allclose(rows.sum(1), torch.ones(len(rows), dtype=rows.dtype), atol=tolerance))


def _as_labels(values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    flat = values.reshape(-1) if values.dim() == 2 and values.shape[1] == 1 else values
    if flat.dim() != 1 or len(flat) != n:
        raise _error(ErrorCode.API_BAD_RESPONSE, f"Expected {n} labels, got shape {list(values.shape)}.",
                     expected=[n], got=list(values.shape))
    if flat.is_floating_point() and not bool(torch.all(flat == flat.round())):
        raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's labels are not integers.")
    labels = flat.long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API returned a label outside 0..{k - 1}.",
                     num_classes=k, max_label=int(labels.max()))
    return labels


def _as_score_rows(values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if values.dim() != 2 or values.shape[0] != n:
        raise _error(ErrorCode.API_BAD_RESPONSE, f"Expected {n} rows of {k} scores, got shape {list(values.shape)}.",
                     expected=[n, k], got=list(values.shape))
    if values.shape[1] != k:
        raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API returned {values.shape[1]} classes, expected {k}.",
                     expected=[n, k], got=list(values.shape))
    return values


# -- wire formats -----------------------------------------------------------------------------------------------


def encode_request(config: ApiConfig, x: torch.Tensor) -> dict[str, Any]:
    images = x.permute(0, 2, 3, 1) if config.input_layout == "nhwc" else x
    images = images.detach().to(torch.float32).contiguous().cpu()
    if config.protocol == "v1":
        return {"instances": images.tolist()}
    if config.protocol == "v2":
        tensor = {"name": config.input_name, "shape": list(images.shape), "datatype": "FP32",
                  "data": images.reshape(-1).tolist()}
        return {"inputs": [tensor]}
    body: dict[str, Any] = {}
    _set_path(body, config.json_request_key, images.tolist())
    return body


def decode_response(config: ApiConfig, payload: Any, n: int) -> torch.Tensor:
    """The numbers of an answer as a tensor (labels (N,) or scores (N, K)), before kind handling."""
    if config.protocol == "v1":
        values = _get_path(payload, "predictions")
        if isinstance(values, list) and values and isinstance(values[0], dict):
            values = [_pick_output_key(item, config.output_name) for item in values]
        return _numeric_tensor(values)
    if config.protocol == "v2":
        return _decode_v2(payload, config.output_name)
    return _numeric_tensor(_get_path(payload, config.json_response_path))


def _decode_v2(payload: Any, output_name: str | None) -> torch.Tensor:
    outputs = _get_path(payload, "outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise _error(ErrorCode.API_BAD_RESPONSE, "The v2 answer has no outputs list.")
    chosen = outputs[0]
    if output_name is not None:
        named = [o for o in outputs if o.get("name") == output_name]
        if not named:
            raise _error(ErrorCode.API_BAD_RESPONSE, f"The v2 answer has no output named {output_name!r}.")
        chosen = named[0]
    shape, data = chosen.get("shape"), chosen.get("data")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _error(ErrorCode.API_BAD_RESPONSE, "The v2 output has no valid shape.")
    values = _numeric_tensor(data).reshape(-1)
    if values.numel() != math.prod(shape):
        raise _error(ErrorCode.API_BAD_RESPONSE, f"The v2 output's data does not fill its shape {shape}.")
    datatype = str(chosen.get("datatype", "")).upper()
    if datatype.startswith(("INT", "UINT")):
        values = values.long()
    return values.reshape(shape)


def _pick_output_key(item: dict[str, Any], name: str | None) -> Any:
    if name is not None:
        if name not in item:
            raise _error(ErrorCode.API_BAD_RESPONSE, f"The answer objects have no key {name!r}.")
        return item[name]
    if len(item) != 1:
        raise _error(ErrorCode.API_BAD_RESPONSE, "The answer objects have several keys; set output_name.",
                     keys=sorted(item)[:10])
    return next(iter(item.values()))


def _numeric_tensor(values: Any) -> torch.Tensor:
    """Nested lists of numbers -> tensor; rejects ragged lists, strings, booleans, NaN and infinities."""
    if not isinstance(values, list):
        raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's answer is not a list of numbers.")
    try:
        tensor = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's answer is not a regular array of numbers.") from exc
    if tensor.dtype == torch.bool:
        raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's answer holds booleans, not numbers.")
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise _error(ErrorCode.API_BAD_RESPONSE, "The model API's answer holds NaN or infinite values.")
        tensor = tensor.double()
    return tensor


def _split_path(path: str) -> list[str]:
    return [part for part in path.split(".") if part]


def _get_path(payload: Any, path: str) -> Any:
    node = payload
    for part in _split_path(path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API's answer has no field {path!r}.", path=path)
    return node


def _set_path(body: dict[str, Any], path: str, value: Any) -> None:
    parts = _split_path(path)
    node = body
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# -- HTTP plumbing ----------------------------------------------------------------------------------------------


def _error(code: ErrorCode, message: str, **detail: object) -> AuditError:
    return AuditError(code, message, dict(detail))


def _check_images(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("predict expects float images (N, C, H, W)")
    return x.detach().to(torch.float32).cpu()


def _pinned_url(target: CheckedURL) -> tuple[str, str]:
    """Rewrite the URL to the approved IP, keeping the original Host header (no second DNS lookup)."""
    parts = urlsplit(target.url)
    ip = target.addresses[0].split("%", 1)[0]
    netloc_ip = f"[{ip}]" if ":" in ip else ip
    default_port = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    host_header = host if target.port == default_port else f"{host}:{target.port}"
    url = urlunsplit((parts.scheme, f"{netloc_ip}:{target.port}", parts.path or "/", parts.query, ""))
    return url, host_header


def _make_session(target: CheckedURL) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: the pinned address is the destination
    if target.scheme == "https":
        session.mount("https://", _PinnedHTTPSAdapter(target.host))
    return session


def _raise_for_status(response: requests.Response, config: ApiConfig) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise _error(ErrorCode.API_AUTH_FAILED, f"The model API refused the credentials (HTTP {status}).", status=status)
    if status in RETRYABLE_STATUS:
        retry_after = _parse_retry_after(response.headers.get("Retry-After"))
        raise _Retryable(
            _error(ErrorCode.API_UNREACHABLE, f"The model API kept failing (last HTTP {status}).", status=status),
            retry_after,
        )
    if 300 <= status < 400:
        raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API redirected (HTTP {status}); redirects are not "
                     "followed. Use the final URL.", status=status)
    raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API rejected the request (HTTP {status}); check the URL, "
                 f"model name '{config.model_name}' and protocol '{config.protocol}'.", status=status)


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date; anything unreadable is ignored."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_capped(response: requests.Response, cap: int, deadline: float, timeout: float) -> bytes:
    """Read the body up to ``cap`` bytes and before ``deadline`` (a slow drip cannot hold a worker)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API's answer is larger than {cap} bytes.", limit=cap)
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(chunk_size=65536):
            size += len(chunk)
            if size > cap:
                raise _error(ErrorCode.API_BAD_RESPONSE, f"The model API's answer is larger than {cap} bytes.", limit=cap)
            if time.monotonic() > deadline:
                raise _Retryable(_error(ErrorCode.API_TIMEOUT, f"The model API's answer took longer than {timeout}s."))
            chunks.append(chunk)
    except (requests.Timeout, requests.exceptions.ChunkedEncodingError, requests.ConnectionError) as exc:
        if _is_timeout(exc):
            raise _Retryable(_error(ErrorCode.API_TIMEOUT, f"The model API's answer did not arrive within {timeout}s.")) from exc
        raise _Retryable(_error(ErrorCode.API_UNREACHABLE, "The connection broke while reading the answer.")) from exc
    return b"".join(chunks)


def _is_timeout(exc: BaseException) -> bool:
    """requests wraps a read timeout while streaming as ConnectionError; look through the chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
        if any(isinstance(arg, BaseException) and _is_timeout(arg) for arg in getattr(seen, "args", ())):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
