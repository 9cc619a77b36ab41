"""Loading untrusted checkpoints without ever unpickling arbitrary objects.

Accepted: TorchScript archives, ``torch.export`` programs (.pt2), safetensors
plus a named architecture, and state dicts read with ``torch.load(weights_only=True)``.
Every other byte stream is refused with ``invalid_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from auditor.errors import AuditError, ErrorCode
from auditor.models.architectures import ArchConfig, Classifier, build_classifier

MAX_CHECKPOINT_BYTES = 1 << 30


@dataclass
class LoadedModel:
    """A model ready to call on [0, 1] images, with what is known of its origin."""

    module: nn.Module
    format: str  # torchscript | export | safetensors | state_dict
    sha256: str
    arch: ArchConfig | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _invalid(message: str, **detail: object) -> AuditError:
    return AuditError(ErrorCode.INVALID_CHECKPOINT, message, dict(detail))


def detect_format(path: Path) -> str:
    """Classify a file by its bytes, never by its name."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any("serialized_exported_program" in n or "/models/" in n for n in names):
            return "export"
        if any(n.endswith("data.pkl") for n in names):
            return "state_dict"
        raise _invalid("The zip archive is not a TorchScript, torch.export or torch.save checkpoint.")
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    raise _invalid(
        "Unrecognised checkpoint format. Upload TorchScript (torch.jit.save), a torch.export .pt2, "
        "safetensors with an architecture, or a zip-format state dict (torch.save)."
    )


def load_checkpoint(
    path: str | Path, arch: ArchConfig | None = None, device: str = "cpu", default_arch: ArchConfig | None = None
) -> LoadedModel:
    """Load a user checkpoint.

    Bare weights need an architecture: ``arch`` (the user's explicit choice) wins,
    then the one a safetensors file records in its metadata, then ``default_arch``.
    """
    path = Path(path)
    if not path.is_file():
        raise _invalid(f"Checkpoint file {path.name!r} does not exist.")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise _invalid("The checkpoint is larger than the 1 GiB limit.", size=path.stat().st_size)
    kind = detect_format(path)
    digest = sha256_file(path)
    try:
        if kind == "torchscript":
            module = torch.jit.load(str(path), map_location=device)
        elif kind == "export":
            module = torch.export.load(str(path)).module()
        else:
            module, arch = _load_weights(path, kind, arch, default_arch)
    except AuditError:
        raise
    except Exception as exc:  # any parser failure is the upload's fault, not ours
        raise _invalid(f"The {kind} checkpoint could not be loaded: {exc}", format=kind) from exc
    if isinstance(module, nn.Module) and kind != "export":
        module.eval()
    return LoadedModel(module=module.to(device), format=kind, sha256=digest, arch=arch)


def _load_weights(
    path: Path, kind: str, arch: ArchConfig | None, default_arch: ArchConfig | None
) -> tuple[Classifier, ArchConfig]:
    if kind == "safetensors":
        state = load_safetensors(str(path))
        if arch is None:
            arch = _arch_from_safetensors_metadata(path)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _invalid(
                "The checkpoint holds objects other than tensors and was refused without being executed.",
                format=kind,
            ) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    arch = arch or default_arch
    if arch is None:
        raise _invalid("Bare weights need an architecture name and config (for example small_cnn).")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _invalid("The file is not a flat mapping of parameter names to tensors.")
    model = build_classifier(arch)
    target = model if any(k.startswith("backbone.") for k in state) else model.backbone
    expected = target.state_dict()
    wrong_shape = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = [k for k in expected if k not in state and k not in {"mean", "std"}]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or wrong_shape:
        raise _invalid(
            f"The weights do not fit architecture {arch.name!r} (width {arch.width}, {arch.num_classes} classes).",
            missing=missing[:10],
            unexpected=unexpected[:10],
            wrong_shape=wrong_shape[:10],
        )
    target.load_state_dict(state, strict=False)
    return model.eval(), arch


def _arch_from_safetensors_metadata(path: Path) -> ArchConfig | None:
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    raw = header.get("__metadata__", {}).get("arch")
    return ArchConfig.from_dict(json.loads(raw)) if raw else None


def save_classifier(model: Classifier, arch: ArchConfig, path: str | Path) -> Path:
    """Weights as safetensors with the architecture in the metadata, so the file is self-describing."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, str(path), metadata={"arch": json.dumps(arch.to_dict())})
    return path


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Script when possible (keeps control flow), trace otherwise."""
    model = model.eval().cpu()
    try:
        scripted = torch.jit.script(model)
    except Exception:
        with torch.no_grad():
            scripted = torch.jit.trace(model, example.cpu())
    torch.jit.save(scripted, str(path))
    return Path(path)
