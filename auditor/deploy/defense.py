"""What ``serve-defended`` needs from an audit: T, M, and how the audited API speaks.

An API audit leaves ``transform.safetensors`` (T's weights, with the REFINE config in
its metadata), ``defense.json`` (M and the REFINE config) and ``report.json`` (the
audited API's protocol, model name, input layout, and the data's image shape and class
count). ``load_defense`` reads a folder holding them; ``fetch_defense`` first downloads
them from a refine-audit service by audit id. The weights are safetensors, parsed as
data: nothing in these files is executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from auditor.client import RefineAuditClient
from auditor.errors import AuditError, ErrorCode
from auditor.models import UNet
from auditor.refine.config import RefineConfig

DEFENSE_FILES = ("transform.safetensors", "defense.json", "report.json")
SERVABLE_PROTOCOLS = ("v1", "v2")


@dataclass(frozen=True)
class ApiShape:
    """How the audited API is called; from the audit's report, or given on the command line."""

    protocol: Literal["v1", "v2"]
    model_name: str = "model"
    input_layout: Literal["nchw", "nhwc"] = "nchw"
    output: str = "auto"  # what the audit was told the API answers; the endpoint maps whatever comes back
    batch_size: int = 64  # images per request the audit sent; the endpoint forwards batches no larger

    def __post_init__(self) -> None:
        if self.protocol not in SERVABLE_PROTOCOLS:
            raise _invalid(f"The audited API speaks {self.protocol!r}; serve-defended speaks v1 and v2.")
        if self.input_layout not in ("nchw", "nhwc"):
            raise _invalid(f"input_layout must be nchw or nhwc, not {self.input_layout!r}.")


@dataclass(frozen=True)
class DefenseBundle:
    """T (eval mode, on the CPU), M, and the audited API's shape and data geometry."""

    transform: UNet
    mapping: torch.Tensor  # pi: when the API says j, the defended answer is pi[j]
    api: ApiShape | None  # None when the audit was of a checkpoint and no protocol was given
    image_shape: tuple[int, int, int]  # (C, H, W) of the images T was trained on
    audit_id: str | None
    source: Path

    @property
    def num_classes(self) -> int:
        return len(self.mapping)


def load_defense(folder: str | Path, overrides: dict[str, Any] | None = None) -> DefenseBundle:
    """Read T, M and the API shape from an audit's output folder; ``overrides`` (protocol,
    model_name, input_layout) fill in or replace what the report says."""
    folder = Path(folder)
    meta = _read_json(folder / "defense.json", required=True)
    report = _read_json(folder / "report.json", required=False)
    mapping = _mapping(meta)
    transform = _transform(folder / "transform.safetensors", meta)
    image_shape = _image_shape(meta, report)
    return DefenseBundle(transform, mapping, _api_shape(meta, report, overrides or {}), image_shape,
                         report.get("audit_id") if report else None, folder)


def fetch_defense(client: RefineAuditClient, audit_id: str, cache_dir: str | Path) -> Path:
    """Download an audit's defense files into ``cache_dir/<audit id>`` and return that folder."""
    folder = Path(cache_dir) / audit_id
    for name in DEFENSE_FILES:
        client.download_artifact(audit_id, name, folder / name)
    return folder


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise _invalid(f"{path.name} is missing from {path.parent}; give an audit's output folder "
                           "(the one holding transform.safetensors and defense.json) or an audit id.")
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _invalid(f"{path.name} must hold a JSON object.")
    return data


def _mapping(meta: dict[str, Any]) -> torch.Tensor:
    raw = meta.get("mapping")
    if not isinstance(raw, list) or not all(isinstance(v, int) for v in raw) or sorted(raw) != list(range(len(raw))):
        raise _invalid("defense.json's mapping must be a permutation of 0..K-1.")
    if len(raw) < 2:
        raise _invalid("defense.json's mapping needs at least two classes.")
    return torch.tensor(raw, dtype=torch.long)


def _transform(path: Path, meta: dict[str, Any]) -> UNet:
    if not path.is_file():
        raise _invalid(f"transform.safetensors is missing from {path.parent}.")
    try:
        config = RefineConfig.from_dict(meta.get("refine_config") or {})
        transform = UNet(config.unet)
        transform.load_state_dict(load_file(str(path)), strict=True)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # safetensors raises several kinds
        raise _invalid(f"transform.safetensors does not fit the U-Net described in defense.json: {exc}") from exc
    return transform.eval()


def _image_shape(meta: dict[str, Any], report: dict[str, Any]) -> tuple[int, int, int]:
    shape = meta.get("image_shape") or ((report.get("inputs") or {}).get("data") or {}).get("image_shape")
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape):
        return tuple(shape)  # type: ignore[return-value]
    raise _invalid("Neither defense.json nor report.json says which image shape the defense was trained on; "
                   "keep the audit's report.json beside transform.safetensors.")


def _api_shape(meta: dict[str, Any], report: dict[str, Any], overrides: dict[str, Any]) -> ApiShape | None:
    """defense.json's ``api`` entry, else the report's spec, each field overridable."""
    spec_api = ((report.get("spec") or {}).get("model") or {}).get("api") or {}
    recorded = {**spec_api, **(meta.get("api") or {})}
    fields = {k: recorded.get(k) for k in ("protocol", "model_name", "input_layout", "output", "batch_size")
              if recorded.get(k)}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ApiShape(**fields) if "protocol" in fields else None


def _invalid(message: str) -> AuditError:
    return AuditError(ErrorCode.INVALID_CHECKPOINT, message)
