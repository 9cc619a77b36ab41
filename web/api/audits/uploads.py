"""Early checks of what a user submits, so a bad upload is a 422 now rather than a
failed audit an hour later.

Everything here reads untrusted bytes without executing them. A model file is a
program, so the web process never deserializes one: checkpoints go through the static
container checks (``auditor.models.containers``: zip structure, every pickle evaluated
symbolically against an allowlist, .pt2 payloads and graph, safetensors headers), and
bare weights that name their architecture are compared with it by declared shapes.
Loading and every forward pass happen in the worker, inside the sandbox. Datasets go
through ``load_dataset``, which checks archive entries for traversal, links and
decompression bombs.
"""

from __future__ import annotations

from pathlib import Path

from auditor.blackbox.ssrf import check_url
from auditor.data.datasets import ImageSet, Limits, load_dataset
from auditor.errors import AuditError, ErrorCode
from auditor.models.checkpoints import architecture_from_metadata, check_weights_fit
from auditor.models.containers import inspect_checkpoint
from auditor.registry.source import check_reference
from auditor.spec import AuditSpec


def check_checkpoint(path: Path) -> str:
    """Refuse any checkpoint the container checks refuse; returns its format.

    Bare weights without an architecture in the file may need the dataset's class count
    to rebuild their model, so the worker checks those against the architecture.
    """
    info = inspect_checkpoint(path)
    arch = architecture_from_metadata(info) if info.tensors is not None else None
    if arch is not None:
        check_weights_fit(info.tensors or {}, arch)
    return info.format


def check_dataset(path: Path, max_bytes: int) -> ImageSet:
    """Decode the whole dataset under the upload limit; raises invalid_dataset, unsafe_archive, ...

    Returns it, so the submission can be planned from its size, shape and classes.
    """
    return load_dataset(path, Limits(max_bytes=max_bytes))


def check_urls(spec: AuditSpec, allowed_hosts: tuple[str, ...]) -> None:
    """The worker will fetch these URLs from inside our network: refuse private targets now."""
    for field, url in _outbound_urls(spec):
        try:
            check_url(url, allowed_hosts)
        except AuditError as exc:
            raise AuditError(exc.code, f"{field}: {exc.message}", {**exc.detail, "field": field}) from None


def _outbound_urls(spec: AuditSpec) -> list[tuple[str, str]]:
    urls = []
    if spec.model.api is not None:
        urls.append(("model.api.url", str(spec.model.api.url)))
    if spec.callback_url is not None:
        urls.append(("callback_url", str(spec.callback_url)))
    return urls


def check_mlflow_source(spec: AuditSpec, tracking_uri: str | None) -> None:
    """A ``model.mlflow`` reference needs the operator's tracking server, and must name a version (or run)
    it has: ``mlflow_not_found`` (422) now rather than a failed audit later. Its shape was checked with the spec."""
    if spec.model.mlflow is None:
        return
    if tracking_uri is None:
        raise _spec_field("model.mlflow", "this service has no MLflow tracking server configured "
                                          "(REFINE_AUDIT_MLFLOW_TRACKING_URI); upload the checkpoint instead")
    check_reference(tracking_uri, spec.model.mlflow.uri)


def check_files_match_spec(spec: AuditSpec, *, has_model: bool, has_dataset: bool) -> None:
    """The spec says what is uploaded; a mismatch is a mistake worth reporting, not guessing."""
    if spec.model.mlflow is not None and has_model:
        raise _spec_field("model.mlflow", "a model file was uploaded as well; send the file or the MLflow reference")
    if spec.model.source == "checkpoint" and spec.model.mlflow is None and not has_model:
        raise AuditError(
            ErrorCode.INVALID_CHECKPOINT,
            "A checkpoint audit needs a 'model' file (send multipart/form-data) or an MLflow reference in "
            "model.mlflow; or use model.source 'api'.",
            {"field": "model"},
        )
    if spec.model.source == "api" and has_model:
        raise _spec_field("model.source", "a model file was uploaded but model.source is 'api'")
    if spec.data.source == "upload" and not has_dataset:
        raise AuditError(
            ErrorCode.INVALID_DATASET, "data.source is 'upload' but no 'dataset' file was sent.", {"field": "dataset"}
        )
    if spec.data.source != "upload" and has_dataset:
        raise _spec_field("data.source", "a dataset file was uploaded; set data.source to 'upload' to use it")


def _spec_field(field: str, message: str) -> AuditError:
    return AuditError(ErrorCode.INVALID_SPEC, f"{field}: {message}", {"fields": [{"field": field, "message": message}]})
