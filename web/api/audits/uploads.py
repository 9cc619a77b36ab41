"""Early checks of what a user submits, so a bad upload is a 422 now rather than a
failed audit an hour later.

Everything here reads untrusted bytes without executing them: checkpoints are
classified by their bytes (``detect_format``) and then loaded the safe way (TorchScript
and ``torch.export`` archives, safetensors headers, ``torch.load(weights_only=True)``);
a pickle is refused before any unpickler sees it. Datasets go through ``load_dataset``,
which checks archive entries for traversal, links and decompression bombs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from auditor.blackbox.ssrf import check_url
from auditor.data.datasets import ImageSet, Limits, load_dataset
from auditor.errors import AuditError, ErrorCode
from auditor.models.checkpoints import detect_format, load_checkpoint
from auditor.spec import AuditSpec

#: Formats that carry their own architecture and can be fully loaded without the data.
SELF_DESCRIBING = ("torchscript", "export")


def check_checkpoint(path: Path) -> str:
    """Refuse anything but a safely loadable checkpoint; returns its format.

    Bare weights (safetensors without an architecture, state dicts) may need the
    dataset's class count to rebuild their model, so here they are only proven to be
    plain tensors; the worker checks that they fit the architecture.
    """
    kind = detect_format(path)
    if kind in SELF_DESCRIBING:
        load_checkpoint(path)
    elif kind == "safetensors":
        if "arch" in _safetensors_metadata(path):
            load_checkpoint(path)
    else:
        _read_state_dict(path)
    return kind


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's metadata, after checking the header parses and names tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise _invalid("The safetensors file holds no tensors.")
            return handle.metadata() or {}
    except AuditError:
        raise
    except Exception as exc:
        raise _invalid(f"The safetensors file could not be read: {exc}") from exc


def _read_state_dict(path: Path) -> None:
    """``weights_only=True`` refuses every object that is not a tensor or a container of them."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise _invalid("The checkpoint holds objects other than tensors and was refused without being executed.") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _invalid("The file is not a flat mapping of parameter names to tensors.")


def _invalid(message: str) -> AuditError:
    return AuditError(ErrorCode.INVALID_CHECKPOINT, message)


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


def check_files_match_spec(spec: AuditSpec, *, has_model: bool, has_dataset: bool) -> None:
    """The spec says what is uploaded; a mismatch is a mistake worth reporting, not guessing."""
    if spec.model.source == "checkpoint" and not has_model:
        raise AuditError(
            ErrorCode.INVALID_CHECKPOINT,
            "A checkpoint audit needs a 'model' file: send multipart/form-data, or use model.source 'api'.",
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
