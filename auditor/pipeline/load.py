"""Stage ``load``: the submitted model, loaded safely from a checkpoint or reached through its API."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import torch

from auditor.blackbox import ApiConfig, HttpModelAPI, api_predictor
from auditor.data import ImageSet
from auditor.errors import AuditError, ErrorCode
from auditor.evaluation import Predictor, model_predictor, predict_labels
from auditor.models import ArchConfig, LoadedModel, load_checkpoint
from auditor.pipeline.state import AuditState
from auditor.training import channels_last_if_accepted

API_FORMATS = {"v1": "kserve_v1", "v2": "oip_v2", "json": "template"}


def stage_load(state: AuditState) -> None:
    if state.spec.model.source == "api":
        connect_api(state)
        return
    if state.inputs.model_path is None:
        if state.spec.model.mlflow is not None:  # fetched by the runner around run_audit (auditor.registry)
            raise AuditError(ErrorCode.INVALID_CHECKPOINT, "The MLflow model was not fetched: run MLflow references "
                                                           "through auditor.sandbox.audit_runner.")
        raise AuditError(ErrorCode.INVALID_CHECKPOINT, "A checkpoint audit needs a model file.")
    fallback = arch_for(state)
    explicit = fallback if state.spec.model.architecture is not None else None
    loaded: LoadedModel = load_checkpoint(state.inputs.model_path, arch=explicit, device=str(state.device),
                                          default_arch=fallback)
    state.model = loaded.module
    state.arch = loaded.arch or fallback
    state.model_info = {
        "source": "checkpoint", "format": loaded.format, "sha256": loaded.sha256,
        "architecture": loaded.arch.name if loaded.arch else f"{loaded.format} (opaque)",
    }
    _check_model_fits_data(state)
    channels_last_if_accepted(state.model, state.test.x[:2].float().div(255).to(state.device))
    if state.test.y is None:
        pseudo_label(state)


def arch_for(state: AuditState) -> ArchConfig:
    """The architecture named in the spec, completed from the data (channels, classes, normalisation)."""
    requested = state.spec.model.architecture
    channels = state.data_info["image_shape"][0]
    x = state.pool.x[:5000].float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    base = ArchConfig("small_cnn", in_channels=channels, num_classes=state.num_classes,
                      image_size=state.data_info["image_shape"][1], mean=mean, std=std)
    if requested is None:
        return base
    return replace(
        base, name=requested.name, in_channels=requested.in_channels or channels,
        mean=tuple(requested.mean) if requested.mean else mean, std=tuple(requested.std) if requested.std else std,
        width=requested.width,
    )


def _check_model_fits_data(state: AuditState) -> None:
    probe = state.test.x[:4].float().div(255).to(state.device)
    try:
        with torch.no_grad():
            logits = state.model(probe)
    except Exception as exc:
        raise AuditError(
            ErrorCode.MODEL_DATA_MISMATCH,
            f"The model cannot take the data's images of shape {list(state.test.shape)}: {exc}",
        ) from exc
    if logits.dim() != 2 or logits.shape[1] != state.num_classes:
        raise AuditError(
            ErrorCode.MODEL_DATA_MISMATCH,
            f"The model returns shape {list(logits.shape)}; expected (N, {state.num_classes}) class scores.",
        )


def reference_predictor(state: AuditState) -> Predictor:
    """The submitted model: the local module, or the real API."""
    if state.api is not None:
        return api_predictor(state.api)
    return model_predictor(state.model, state.device)


def pseudo_label(state: AuditState) -> None:
    """Unlabelled data: the submitted model's own predictions stand in for labels (reported as such)."""
    predict = reference_predictor(state)
    state.test = ImageSet(state.test.x, predict_labels(predict, state.test), state.test.class_names)
    state.pool = ImageSet(state.pool.x, predict_labels(predict, state.pool), state.pool.class_names)
    state.warnings.append("The dataset has no labels: BA and per-class accuracy are measured against the submitted "
                          "model's own predictions.")


def connect_api(state: AuditState) -> None:
    api = state.spec.model.api
    config = ApiConfig(
        url=str(api.url), num_classes=state.num_classes, protocol=api.protocol, model_name=api.model_name,
        output=api.output, auth_header=api.auth_header, auth_value=api.auth_value, batch_size=api.batch_size,
        max_concurrency=api.max_concurrency, rate_limit_per_s=api.rate_limit_per_s, timeout_s=api.timeout_s,
        query_budget=api.query_budget, input_layout=api.input_layout, json_request_key=api.json_request_key,
        json_response_path=api.json_response_path,
    )
    state.api = HttpModelAPI(config, allowed_hosts=state.inputs.allowed_hosts)
    state.arch = arch_for(state)
    state.model_info = {
        "source": "api", "format": API_FORMATS[api.protocol], "url": url_without_credentials(str(api.url)),
        "architecture": f"surrogate: {state.arch.name}",
    }
    if state.test.y is None:
        state.warnings.append("The dataset has no labels: BA is measured against the API's own answers.")


def url_without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
