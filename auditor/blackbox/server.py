"""A reference model server on the standard library: serves any ``nn.Module`` over KServe v1 and OIP v2.
(Over 400 lines: both wire protocols' requests, answers and error shapes, which the client's tests are checked against.)

Why it exists: black-box audits need something real to audit in tests, demos and
benchmarks (``refine-audit serve-model``), and the server's own query count is the
independent witness that the client's budget accounting is right (``GET /stats``).
It is deliberately small: ``http.server.ThreadingHTTPServer``, one lock around the
model, JSON bodies. It binds 127.0.0.1 unless told otherwise.

Scripted faults (``ModelServer.inject``) make it misbehave on purpose — errors,
``Retry-After``, slowness, malformed answers — so the client's handling of each
failure is tested against real HTTP instead of mocks.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

import torch
from torch import nn

log = logging.getLogger(__name__)

ServeProtocol = Literal["v1", "v2", "both"]
Corruption = Literal["wrong_shape", "nan", "extra_class", "not_json", "huge"]

V1_PREDICT = re.compile(r"^/v1/models/(?P<name>[^/:]+):predict$")
V1_METADATA = re.compile(r"^/v1/models/(?P<name>[^/:]+)$")
V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)/infer$")
V2_METADATA = re.compile(r"^/v2/models/(?P<name>[^/]+)$")


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, applied to one inference request (see ``ModelServer.inject``)."""

    status: int | None = None  # answer with this HTTP status instead of predicting (nothing is counted)
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers, e.g. (("Retry-After", "1"),)
    delay_s: float = 0.0  # sleep before answering: drives the client into its timeout
    corrupt: Corruption | None = None  # predict (and count), then damage the answer this way

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")


class BadRequest(Exception):
    """The client sent something the server cannot run; answered with HTTP 400."""


class BackgroundHTTPServer:
    """A ``ThreadingHTTPServer`` with the lifecycle tests and the CLI share: ``start`` serves from a
    daemon thread (tests), ``serve_forever`` from the caller (the CLI), ``stop`` ends either."""

    _scheme = "http"

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], thread_name: str):
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]  # handlers reach their server's state here
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self._scheme}://{host}:{self.port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            self.closed()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.closed()

    def closed(self) -> None:
        """Release what the subclass holds (connections to other servers); called once serving ended."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ModelServer(BackgroundHTTPServer):
    """Serve ``module`` ([0, 1] images (N, C, H, W) -> logits) until stopped.

    Use as a context manager in tests (port 0 picks a free port; ``.url`` is the base
    URL) or call ``serve_forever`` from the CLI.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        host: str = "127.0.0.1",  # loopback by default: exposing a model is an explicit choice
        port: int = 0,  # 0 = any free port (tests)
        protocol: ServeProtocol = "both",  # which routes answer; both is handy and harmless
        labels_only: bool = False,  # answer with top-1 labels only, like a hardened commercial API
        output: Literal["probabilities", "logits"] = "probabilities",  # what score APIs return
        model_name: str = "model",
        input_layout: Literal["nchw", "nhwc"] = "nchw",  # how the request nests images
        api_key: str | None = None,  # when set, require "Authorization: Bearer <key>"
        max_request_bytes: int = 64 * 1024 * 1024,  # refuse larger bodies with 413
        max_batch: int = 4096,  # refuse larger batches with 400
        ssl_context: ssl.SSLContext | None = None,  # serve https (demos of TLS APIs, tests of certificate checks)
    ):
        if protocol not in ("v1", "v2", "both"):
            raise ValueError("protocol must be v1, v2 or both")
        if output not in ("probabilities", "logits") or input_layout not in ("nchw", "nhwc"):
            raise ValueError("output must be probabilities or logits; input_layout nchw or nhwc")
        self.module = module.eval()
        self.protocol = protocol
        self.labels_only = labels_only
        self.output = output
        self.model_name = model_name
        self.input_layout = input_layout
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self._model_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._queries = 0
        self._requests = 0
        self._faults: collections.deque[Fault] = collections.deque()
        self._standing_fault: Fault | None = None
        super().__init__(host, port, _Handler, "model-server")
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
            self._scheme = "https"

    # -- stats and faults -----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Images answered (``queries``) and successful inference requests (``requests``)."""
        with self._stats_lock:
            return {"queries": self._queries, "requests": self._requests}

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each inference request consumes the next one, then behaviour is normal again."""
        with self._stats_lock:
            self._faults.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Apply ``fault`` to every request (after the queued ones) until cleared with None."""
        with self._stats_lock:
            self._standing_fault = fault

    def _next_fault(self) -> Fault | None:
        with self._stats_lock:
            return self._faults.popleft() if self._faults else self._standing_fault

    # -- inference ------------------------------------------------------------------------------------------------

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Labels (N,) or scores (N, K) for float images (N, C, H, W); counts the images."""
        if x.dim() != 4 or len(x) == 0:
            raise BadRequest(f"expected a non-empty batch of images (N, C, H, W), got shape {list(x.shape)}")
        if len(x) > self.max_batch:
            raise BadRequest(f"batch of {len(x)} images exceeds the limit of {self.max_batch}")
        if not bool(torch.isfinite(x).all()):
            raise BadRequest("inputs must be finite numbers")
        if self.input_layout == "nhwc":
            x = x.permute(0, 3, 1, 2).contiguous()
        with self._model_lock, torch.no_grad():
            try:
                logits = self.module(x).float()
            except RuntimeError as exc:  # wrong image size or channels for this model
                raise BadRequest(f"the model cannot run on inputs of shape {list(x.shape)}: {exc}") from exc
        with self._stats_lock:
            self._queries += len(x)
            self._requests += 1
        if self.labels_only:
            return logits.argmax(1)
        return logits if self.output == "logits" else torch.softmax(logits, dim=1)


def _corrupt(values: torch.Tensor, how: Corruption) -> torch.Tensor:
    """Damage an answer the way broken or hostile servers do."""
    if how == "wrong_shape":
        return values[:-1]
    if how == "extra_class":
        if values.dim() == 1:
            return torch.full_like(values, int(values.max()) + 100)
        return torch.cat([values, values[:, :1]], dim=1)
    if how == "nan":
        values = values.double().clone()
        values.view(-1)[0] = float("nan")
        return values
    return values


def v1_body(values: torch.Tensor) -> dict[str, Any]:
    return {"predictions": values.tolist()}


def v2_body(values: torch.Tensor, model_name: str) -> dict[str, Any]:
    datatype = "FP32" if values.is_floating_point() else "INT64"
    if values.dtype == torch.float64:
        datatype = "FP64"
    tensor = {"name": "output", "shape": list(values.shape), "datatype": datatype, "data": values.reshape(-1).tolist()}
    return {"model_name": model_name, "outputs": [tensor]}


def tensor_from_v1(body: Any) -> torch.Tensor:
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise BadRequest('the body must be {"instances": [...]}')
    return _float_tensor(body["instances"])


def tensor_from_v2(body: Any) -> torch.Tensor:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest('the body must be {"inputs": [{"name", "shape", "datatype", "data"}]} with one input')
    shape, data = inputs[0].get("shape"), inputs[0].get("data")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise BadRequest("the input needs a shape of positive integers")
    flat = _float_tensor(data).reshape(-1)
    if flat.numel() != torch.Size(shape).numel():
        raise BadRequest(f"the input data does not fill shape {shape}")
    return flat.reshape(shape)


def _float_tensor(values: Any) -> torch.Tensor:
    try:
        return torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadRequest("inputs must be a regular array of numbers") from exc


class JsonRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, JSON in and out, capped bodies, bearer keys: what every inference route here needs.

    ``ModelServer`` and the defended endpoint (``auditor.deploy``) subclass it, so both
    refuse oversized or length-less bodies and compare keys the same way.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped
    # Headers and body leave in two writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK of the headers, adding up to 40 ms to every keep-alive answer.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        log.debug("%s - %s", self.address_string(), format % args)

    def bearer_key_ok(self, key: str | None) -> bool:
        """No key configured, or ``Authorization: Bearer <key>`` (compared in constant time)."""
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def read_body(self, limit: int) -> bytes | None:
        """The whole request body, or None after answering 411/413 (and closing, since the body is unread)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        if int(length) > limit:
            self.close_connection = True
            self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"request body larger than {limit} bytes"})
            return None
        return self.rfile.read(int(length))

    def send_json(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts); nothing to tell it
            self.close_connection = True


class _Handler(JsonRequestHandler):
    """Routes one request; all state lives on the ``ModelServer``."""

    server_version = "refine-audit-model-server/1"

    @property
    def app(self) -> ModelServer:
        return self.server.app  # type: ignore[attr-defined]

    # -- GET ------------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        app = self.app
        if path == "/stats":
            return self.send_json(HTTPStatus.OK, app.stats())
        if path in ("/v2/health/ready", "/v2/health/live") and app.protocol != "v1":
            return self.send_json(HTTPStatus.OK, {"ready": True, "live": True})
        if not self._authorized():
            return self.send_json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API key"})
        v1, v2 = V1_METADATA.match(path), V2_METADATA.match(path)
        if v1 and app.protocol != "v2" and v1["name"] == app.model_name:
            return self.send_json(HTTPStatus.OK, {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                                                             "status": {"error_code": "OK"}}]})
        if v2 and app.protocol != "v1" and v2["name"] == app.model_name:
            return self.send_json(HTTPStatus.OK, self._v2_metadata())
        return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    def _v2_metadata(self) -> dict[str, Any]:
        out = {"name": "output", "datatype": "INT64" if self.app.labels_only else "FP32",
               "shape": [-1] if self.app.labels_only else [-1, -1]}
        return {"name": self.app.model_name, "versions": ["1"], "platform": "pytorch",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1, -1, -1]}], "outputs": [out]}

    # -- POST -----------------------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        app = self.app
        body = self.read_body(self.app.max_request_bytes)
        if body is None:
            return
        v1, v2 = V1_PREDICT.match(path), V2_INFER.match(path)
        route = "v1" if v1 and app.protocol != "v2" else "v2" if v2 and app.protocol != "v1" else None
        match = v1 if route == "v1" else v2
        if route is None or match is None or match["name"] != app.model_name:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no model route {path}"})
        if not self._authorized():
            return self.send_json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API key"})
        fault = app._next_fault()
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None:
            return self.send_json(fault.status, {"error": "injected fault"}, fault.headers)
        try:
            parsed = json.loads(body)
            x = tensor_from_v1(parsed) if route == "v1" else tensor_from_v2(parsed)
            values = app.infer(x)
        except (ValueError, BadRequest) as exc:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        self._send_prediction(route, values, fault)

    def _send_prediction(self, route: str, values: torch.Tensor, fault: Fault | None) -> None:
        corrupt = fault.corrupt if fault is not None else None
        headers = fault.headers if fault is not None else ()
        if corrupt == "not_json":
            return self.send_bytes(HTTPStatus.OK, b"<html>upstream error</html>", "text/html", headers)
        if corrupt is not None:
            values = _corrupt(values, corrupt)
        payload = v1_body(values) if route == "v1" else v2_body(values, self.app.model_name)
        if corrupt == "huge":
            payload["padding"] = "x" * (4 * 1024 * 1024)
        self.send_json(HTTPStatus.OK, payload, headers)

    def _authorized(self) -> bool:
        return self.bearer_key_ok(self.app.api_key)


def run_server(
    module: nn.Module,
    host: str = "127.0.0.1",
    port: int = 8080,
    protocol: ServeProtocol = "both",
    labels_only: bool = False,
    model_name: str = "model",
) -> None:
    """Entry point for ``refine-audit serve-model``: serve until Ctrl-C."""
    server = ModelServer(module, host=host, port=port, protocol=protocol, labels_only=labels_only,
                         model_name=model_name)
    log.info("serving %s (%s%s) at %s", model_name, protocol, ", labels only" if labels_only else "", server.url)
    print(f"Serving model {model_name!r} over {protocol} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
