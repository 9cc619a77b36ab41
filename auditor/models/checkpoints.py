"""Loading untrusted checkpoints without ever unpickling arbitrary objects.

Accepted: TorchScript archives, ``torch.export`` programs (.pt2), safetensors
plus a named architecture, and state dicts read with ``torch.load(weights_only=True)``.
Every file first passes the static container checks of ``auditor.models.containers``
(which refuse pickled objects, code-loading .pt2 payloads, zip tricks and absurd
tensor shapes without deserializing anything); only then does a torch loader see it.
Every other byte stream is refused with ``invalid_checkpoint``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from auditor.errors import AuditError
from auditor.models.architectures import ArchConfig, Classifier, build_classifier
from auditor.models.containers import CheckpointInfo, TensorSpec, inspect_checkpoint, invalid


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


def load_checkpoint(
    path: str | Path, arch: ArchConfig | None = None, device: str = "cpu", default_arch: ArchConfig | None = None
) -> LoadedModel:
    """Load a user checkpoint.

    Bare weights need an architecture: ``arch`` (the user's explicit choice) wins,
    then the one a safetensors file records in its metadata, then ``default_arch``.
    """
    path = Path(path)
    info = inspect_checkpoint(path)  # always first: nothing below may see a file these checks refuse
    kind = info.format
    digest = sha256_file(path)
    try:
        if kind == "torchscript":
            with quiet_torchscript():
                module = torch.jit.load(str(path), map_location=device)
        elif kind == "export":
            # check_guards=False: the default turns the archive's guards_code into Python source and exec()s it
            module = torch.export.load(str(path)).module(check_guards=False)
        else:
            module, arch = _load_weights(path, info, arch, default_arch)
    except AuditError:
        raise
    except Exception as exc:  # any parser failure is the upload's fault, not ours
        raise invalid(f"The {kind} checkpoint could not be loaded: {exc}", format=kind) from exc
    if isinstance(module, nn.Module) and kind != "export":
        module.eval()
    return LoadedModel(module=module.to(device), format=kind, sha256=digest, arch=arch)


def _load_weights(
    path: Path, info: CheckpointInfo, arch: ArchConfig | None, default_arch: ArchConfig | None
) -> tuple[Classifier, ArchConfig]:
    arch = arch or architecture_from_metadata(info) or default_arch
    if arch is None:
        raise invalid("Bare weights need an architecture name and config (for example small_cnn).")
    model = build_classifier(arch)
    target = check_weights_fit(info.tensors or {}, arch, model)
    if info.format == "safetensors":
        state = load_safetensors(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    target.load_state_dict(state, strict=False)
    return model.eval(), arch


def architecture_from_metadata(info: CheckpointInfo) -> ArchConfig | None:
    """The architecture refine-audit records in the safetensors files it writes."""
    raw = info.metadata.get("arch")
    if not raw:
        return None
    try:
        return ArchConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError, KeyError) as exc:
        raise invalid(f"The safetensors metadata names an invalid architecture: {exc}") from None


def check_weights_fit(tensors: dict[str, TensorSpec], arch: ArchConfig, model: Classifier | None = None) -> nn.Module:
    """Compare declared names and shapes with the architecture's; returns the module the weights belong to.

    Works on what the container declares, so the web process can run it without loading the file.
    """
    model = model or build_classifier(arch)
    target = model if any(k.startswith("backbone.") for k in tensors) else model.backbone
    expected = target.state_dict()
    wrong_shape = [k for k, v in tensors.items() if k in expected and tuple(expected[k].shape) != v.shape]
    missing = [k for k in expected if k not in tensors and k not in {"mean", "std"}]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected or wrong_shape:
        raise invalid(
            f"The weights do not fit architecture {arch.name!r} (width {arch.width}, {arch.num_classes} classes).",
            missing=missing[:10],
            unexpected=unexpected[:10],
            wrong_shape=wrong_shape[:10],
        )
    return target


def save_classifier(model: Classifier, arch: ArchConfig, path: str | Path) -> Path:
    """Weights as safetensors with the architecture in the metadata, so the file is self-describing."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, str(path), metadata={"arch": json.dumps(arch.to_dict())})
    return path


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Script when possible (keeps control flow), trace otherwise."""
    model = model.eval().cpu()
    with quiet_torchscript():
        try:
            scripted = torch.jit.script(model)
        except Exception:
            with torch.no_grad():
                scripted = torch.jit.trace(model, example.cpu())
        torch.jit.save(scripted, str(path))
    return Path(path)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's deprecation notice for TorchScript, which users still upload and load.

    Each call site warns once per process, and every sandboxed load is a new process, so
    without this a worker's log repeats the notice for every audit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\..*deprecated", category=FutureWarning)
        yield
