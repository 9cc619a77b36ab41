"""The defended endpoint: ``M ∘ upstream ∘ T`` behind the upstream's own protocol.

A client that called the audited model API calls this server instead, at the same
path with the same body (KServe v1 ``instances``/``predictions`` or Open Inference
Protocol v2 ``inputs``/``outputs``). Each request's batch, as it arrives, is
transformed by T, forwarded to the upstream as one request (or several of the audited
batch size), and the upstream's answer is mapped through M in whatever form it came —
labels, probabilities or logits — and returned in the same wire format. Nothing is
cached and no budget applies: this is production traffic, not an audit.

Safety: the upstream URL passes the SSRF guard and its address is pinned (the audit's
own ``ApiTransport``); its credential comes from an environment variable or a file,
never the command line; request bodies, batch sizes and concurrent work are capped;
every upstream call has a timeout. ``/healthz`` answers while the process lives,
``/readyz`` (and v2's ``/v2/health/ready``) only while the upstream answers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import torch

from auditor.blackbox.client import ApiConfig, ApiTransport, decode_response, encode_request
from auditor.blackbox.defended import transform_images
from auditor.blackbox.server import (
    BackgroundHTTPServer,
    BadRequest,
    JsonRequestHandler,
    tensor_from_v1,
    tensor_from_v2,
)
from auditor.deploy.defense import ApiShape, DefenseBundle
from auditor.errors import AuditError, ErrorCode
from auditor.refine.defended import inference_transform

log = logging.getLogger(__name__)

PIXEL_TOLERANCE = 1e-4  # images must be in [0, 1] as audited; float JSON may overshoot by rounding
UPSTREAM_STATUS = {ErrorCode.API_TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT}  # everything else upstream is 502


@dataclass(frozen=True)
class EndpointLimits:
    """What one endpoint process accepts; sized for a CPU beside the model server."""

    max_request_bytes: int = 32 * 1024 * 1024  # larger bodies get 413 before they are read
    max_batch: int = 512  # images per request; larger batches get 413
    max_in_flight: int = 8  # requests being transformed or forwarded at once; more wait up to queue_timeout_s
    queue_timeout_s: float = 10.0  # then 503 with Retry-After
    ready_cache_s: float = 2.0  # readiness probes reuse an upstream check this recent

    def __post_init__(self) -> None:
        if min(self.max_request_bytes, self.max_batch, self.max_in_flight) < 1 or self.queue_timeout_s <= 0:
            raise ValueError("endpoint limits must be positive")


class DefendedEndpoint(BackgroundHTTPServer):
    """Serve the defense in front of ``upstream`` (an ``ApiConfig`` for the audited API) until stopped."""

    def __init__(
        self,
        bundle: DefenseBundle,
        upstream: ApiConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        allowed_hosts: tuple[str, ...] = (),
        limits: EndpointLimits = EndpointLimits(),
        device: torch.device = torch.device("cpu"),
    ):
        if bundle.api is None:
            raise AuditError(ErrorCode.INVALID_SPEC, "The defense does not say which protocol the upstream speaks; "
                             "pass --protocol v1 or v2.")
        if upstream.protocol != bundle.api.protocol or upstream.num_classes != bundle.num_classes:
            raise ValueError("the upstream config must use the defense's protocol and class count")
        self.bundle = bundle
        self.api: ApiShape = bundle.api
        self.limits = limits
        self.device = device
        self.transform = inference_transform(bundle.transform.to(device))
        self.upstream = upstream
        self._transport = ApiTransport(upstream, allowed_hosts)
        self.slots = threading.BoundedSemaphore(limits.max_in_flight)  # requests being worked on
        self._ready_lock = threading.Lock()
        self._ready_at, self._ready = 0.0, False
        self.routes = _inference_routes(upstream, self.api)  # paths clients may POST to
        super().__init__(host, port, _Handler, "defended-endpoint")

    @property
    def predict_path(self) -> str:
        """Where clients POST: the upstream's own inference path."""
        return self.routes[0]

    def closed(self) -> None:
        self._transport.close()

    # -- the defense ----------------------------------------------------------------------------------------------

    def upstream_ready(self) -> bool:
        """Whether the upstream answers its status route (cached briefly: probes come often)."""
        with self._ready_lock:
            if time.monotonic() - self._ready_at < self.limits.ready_cache_s:
                return self._ready
        status = self._transport.get_status(_status_path(self.upstream, self.api))
        with self._ready_lock:
            self._ready_at, self._ready = time.monotonic(), status == HTTPStatus.OK
            return self._ready

    def images_from_request(self, body: Any) -> tuple[torch.Tensor, str | None]:
        """The request's images as (N, C, H, W) in [0, 1], and the v2 input name to pass on."""
        if self.api.protocol == "v1":
            x, input_name = tensor_from_v1(body), None
        else:
            x, input_name = tensor_from_v2(body), body["inputs"][0].get("name")
        if x.dim() != 4 or len(x) == 0:
            raise BadRequest(f"expected a non-empty batch of images, got shape {list(x.shape)}")
        if self.api.input_layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[1:]) != self.bundle.image_shape:
            raise BadRequest(f"images must have shape {list(self.bundle.image_shape)} "
                             f"({self.api.input_layout}), got {list(x.shape[1:])}")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < -PIXEL_TOLERANCE or float(x.max()) > 1 + PIXEL_TOLERANCE:
            raise BadRequest("pixel values must be finite and in [0, 1], as the model was audited")
        return x.clamp(0.0, 1.0).contiguous(), input_name if isinstance(input_name, str) else None

    def defend(self, x: torch.Tensor, input_name: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """M ∘ upstream ∘ T for (N, C, H, W) images: mapped labels (N,) or scores (N, K), and the
        upstream's v2 output description (name, datatype) to answer with."""
        transformed = transform_images(self.transform, x, self.device)
        config = replace(self.upstream, input_name=input_name) if input_name else self.upstream
        answers, output = [], {}
        for start in range(0, len(transformed), config.batch_size):
            chunk = transformed[start : start + config.batch_size]
            payload = self._transport.post(encode_request(config, chunk))
            answers.append(decode_response(config, payload, len(chunk)))
            output = output or _v2_output_description(payload, config.output_name)
        return self.remap(torch.cat(answers)), output

    def remap(self, values: torch.Tensor) -> torch.Tensor:
        """Apply M to labels (``π[label]``) or to score columns (``q[:, π[j]] = s[:, j]``)."""
        mapping = self.bundle.mapping
        if values.dim() == 2 and values.shape[1] == 1:
            values = values.reshape(-1)
        if values.dim() == 1:
            labels = values.long()
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(mapping)):
                raise AuditError(ErrorCode.API_BAD_RESPONSE, "The upstream returned a label outside the audited classes.")
            return mapping[labels]
        if values.dim() != 2 or values.shape[1] != len(mapping):
            raise AuditError(ErrorCode.API_BAD_RESPONSE, f"The upstream returned shape {list(values.shape)}; "
                             f"the defense maps {len(mapping)} classes.")
        remapped = torch.empty_like(values)
        remapped[:, mapping] = values
        return remapped


def _inference_routes(config: ApiConfig, api: ApiShape) -> tuple[str, ...]:
    """The upstream's own inference path first, then the protocol's standard path for the model."""
    standard = f"/v1/models/{api.model_name}:predict" if api.protocol == "v1" else f"/v2/models/{api.model_name}/infer"
    own = urlsplit(config.endpoint()).path or standard
    return tuple(dict.fromkeys((own, standard)))


def _status_path(config: ApiConfig, api: ApiShape) -> str:
    """The upstream's model status route: KServe v1 ``/v1/models/{name}``, OIP v2 ``/v2/models/{name}``."""
    path = urlsplit(config.endpoint()).path
    suffix = ":predict" if api.protocol == "v1" else "/infer"
    return path[: -len(suffix)] if path.endswith(suffix) else path


def _v2_output_description(payload: Any, output_name: str | None) -> dict[str, Any]:
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list):
        return {}
    chosen = next((o for o in outputs if isinstance(o, dict) and (output_name is None or o.get("name") == output_name)), {})
    return {"name": chosen.get("name", "output"), "datatype": chosen.get("datatype")}


def _answer(api: ApiShape, values: torch.Tensor, output: dict[str, Any], request: Any) -> dict[str, Any]:
    """The mapped values in the upstream's wire format (v2 keeps its output name, datatype and the request id)."""
    if api.protocol == "v1":
        return {"predictions": values.tolist()}
    datatype = output.get("datatype") or ("INT64" if not values.is_floating_point() else "FP32")
    tensor = {"name": output.get("name") or "output", "shape": list(values.shape), "datatype": datatype,
              "data": values.reshape(-1).tolist()}
    body: dict[str, Any] = {"model_name": api.model_name, "outputs": [tensor]}
    if isinstance(request, dict) and isinstance(request.get("id"), str):
        body["id"] = request["id"]
    return body


class _Handler(JsonRequestHandler):
    server_version = "refine-audit-defended/1"

    @property
    def endpoint(self) -> DefendedEndpoint:
        return self.server.app  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        endpoint = self.endpoint
        if path in ("/healthz", "/v2/health/live"):
            return self.send_json(HTTPStatus.OK, {"live": True})
        if path in ("/readyz", "/v2/health/ready", _status_path(endpoint.upstream, endpoint.api)):
            ready = endpoint.upstream_ready()
            return self.send_json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                                  {"ready": ready, "upstream": "answers" if ready else "does not answer"})
        return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        endpoint = self.endpoint
        body = self.read_body(endpoint.limits.max_request_bytes)
        if body is None:
            return
        if path not in endpoint.routes:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no model route {path}; "
                                                          f"POST to {endpoint.predict_path}"})
        try:
            request = json.loads(body)
            x, input_name = endpoint.images_from_request(request)
        except (ValueError, BadRequest, KeyError, TypeError) as exc:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        if len(x) > endpoint.limits.max_batch:
            return self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  {"error": f"batch of {len(x)} images exceeds the limit of {endpoint.limits.max_batch}"})
        if not endpoint.slots.acquire(timeout=endpoint.limits.queue_timeout_s):
            return self.send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy; retry shortly"}, (("Retry-After", "1"),))
        try:
            values, output = endpoint.defend(x, input_name)
        except AuditError as exc:
            log.warning("upstream call failed: %s %s", exc.code.value, exc.message)
            status = UPSTREAM_STATUS.get(exc.code, HTTPStatus.BAD_GATEWAY)
            return self.send_json(status, {"error": exc.message, "code": exc.code.value})
        finally:
            endpoint.slots.release()
        self.send_json(HTTPStatus.OK, _answer(endpoint.api, values, output, request))
