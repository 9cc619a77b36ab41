"""The defended model in the formats people deploy today, each proven by reloading it.

A checkpoint audit ends with ``DefendedModel`` (T, f and M in one module). Users load
it with tools that know nothing of this project, so each file must stand alone:

* ``defended_model.pt2``: a ``torch.export`` program (``torch.export.load(...).module()``),
  the format PyTorch now recommends for deployment;
* ``defended_model.onnx``: ONNX (``torch.onnx.export`` through onnxscript), for
  onnxruntime, TensorRT, OpenVINO and friends;
* ``defended_model.pt``: TorchScript, kept for existing users while torch still loads
  it. torch 2.14 marks ``torch.jit`` deprecated and warns on every trace, save and
  load; we write it with those warnings silenced, and the report flags the format as
  deprecated so users move to ``.pt2``.

An export is only listed as good after the written file is loaded back (ONNX with
onnxruntime) and its top-1 answers agree with the in-memory model on every check image.
The largest difference of log-probabilities is reported too, since a format may round
differently without changing any answer. A format that cannot be produced — a model
uploaded as TorchScript cannot be re-exported by ``torch.export`` — is reported with its
reason; it never fails the audit, because the other formats still serve the user.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from auditor.models.checkpoints import quiet_torchscript, sha256_file
from auditor.refine.defended import DefendedModel

log = logging.getLogger(__name__)

CHECK_BATCH = 256  # images per forward pass when comparing a reloaded export with the model
ONNX_OPSET = 18  # the dynamo exporter's default; onnxruntime 1.16+ runs it
INPUT_NAME = "input"  # what ONNX users feed: float images in [0, 1], (N, C, H, W)
OUTPUT_NAME = "log_probs"  # the defended log-probabilities, (N, K); argmax is the label
Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportCheck:
    """How a reloaded export compares with the in-memory defended model."""

    images: int  # check images compared
    agreement: float  # share with the same top-1 class; 1.0 is what "verified" means
    max_abs_diff: float  # largest |log-probability| difference over all images and classes

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.agreement == 1.0


@dataclass(frozen=True)
class ExportedModel:
    """One format of the defended model, for the report and the artifact list."""

    format: str  # torch_export | onnx | torchscript
    name: str  # file name, e.g. defended_model.onnx
    path: Path | None  # None when the format could not be produced
    sha256: str | None
    check: ExportCheck | None
    deprecated: bool = False  # TorchScript: still loads, but torch warns users off it
    error: str | None = None  # why the format is missing or failed its check

    @property
    def verified(self) -> bool:
        return self.error is None and self.check is not None and self.check.passed

    def to_report(self) -> dict[str, Any]:
        """The report's entry for this format (``defense.exports`` in the report)."""
        check = None if self.check is None else {
            "images": self.check.images, "agreement": self.check.agreement,
            "max_abs_diff": self.check.max_abs_diff, "passed": self.check.passed,
        }
        return {"format": self.format, "name": self.name, "sha256": self.sha256, "verified": self.verified,
                "deprecated": self.deprecated, "check": check, "error": self.error}


# -- the formats -----------------------------------------------------------------------------------------------


def export_program(defended: DefendedModel, images: torch.Tensor, path: str | Path, *,
                   expected: torch.Tensor | None = None) -> ExportedModel:
    """``torch.export`` program (.pt2) with a dynamic batch dimension, reloaded with ``torch.export.load``."""
    path = Path(path)

    if _holds_torchscript(defended):
        return _not_exportable("torch_export", path)

    def write() -> Predict:
        program = torch.export.export(_cpu_eval(defended), (images[:2].cpu(),), dynamic_shapes=_dynamic_batch())
        torch.export.save(program, str(path))
        reloaded = torch.export.load(str(path)).module()
        return lambda x: reloaded(x)

    return _export_and_check("torch_export", path, defended, images, write, expected)


def export_onnx(defended: DefendedModel, images: torch.Tensor, path: str | Path, *,
                expected: torch.Tensor | None = None) -> ExportedModel:
    """ONNX (one self-contained file, dynamic batch), reloaded and run with onnxruntime."""
    path = Path(path)
    if _holds_torchscript(defended):
        return _not_exportable("onnx", path)

    def write() -> Predict:
        with _quiet_onnx_exporter():
            torch.onnx.export(
                _cpu_eval(defended), (images[:2].cpu(),), str(path), dynamo=True, opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_batch(),
                external_data=False, verbose=False, report=False,
            )
        return _onnxruntime_predictor(path)

    return _export_and_check("onnx", path, defended, images, write, expected)


def export_torchscript(defended: DefendedModel, images: torch.Tensor, path: str | Path, *,
                       expected: torch.Tensor | None = None) -> ExportedModel:
    """TorchScript by tracing (works for every model, uploaded TorchScript included), reloaded with ``torch.jit.load``."""
    path = Path(path)

    def write() -> Predict:
        export_defended(defended, images[:2], path)
        with quiet_torchscript():
            reloaded = torch.jit.load(str(path), map_location="cpu")
        return lambda x: reloaded(x)

    return _export_and_check("torchscript", path, defended, images, write, expected, deprecated=True)


EXPORTERS: dict[str, tuple[str, Callable[..., ExportedModel]]] = {
    "torch_export": ("defended_model.pt2", export_program),
    "onnx": ("defended_model.onnx", export_onnx),
    "torchscript": ("defended_model.pt", export_torchscript),
}


def export_defended_formats(
    defended: DefendedModel, images: torch.Tensor, out_dir: str | Path, formats: tuple[str, ...] = tuple(EXPORTERS)
) -> list[ExportedModel]:
    """Write and verify every format in ``out_dir``; ``images`` are float [0, 1] check images (N, C, H, W).

    The pipeline's "save defense" step calls this with the audit's test images, adds the
    files that exist as artifacts and the ``to_report()`` entries to the report. The
    model is moved to the CPU for exporting and left there.
    """
    unknown = sorted(set(formats) - set(EXPORTERS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; known: {sorted(EXPORTERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _require_check_images(images)
    expected = model_outputs(_cpu_eval(defended), images)  # once for every format, not once per format
    results = []
    for fmt in formats:
        name, exporter = EXPORTERS[fmt]
        results.append(exporter(defended, images, out_dir / name, expected=expected))
    return results


def export_defended(defended: DefendedModel, example: torch.Tensor, path: str | Path) -> Path:
    """TorchScript only, without the reload check: the pipeline's single format until it calls
    ``export_defended_formats``."""
    with quiet_torchscript():
        traced = torch.jit.trace(_cpu_eval(defended), example.cpu(), check_trace=False)
        torch.jit.save(traced, str(path))
    return Path(path)


# -- checking --------------------------------------------------------------------------------------------------


def model_outputs(model: Predict, images: torch.Tensor) -> torch.Tensor:
    """The in-memory model's outputs on the check images, in batches: what every reloaded format must reproduce."""
    with torch.no_grad():
        return torch.cat([model(images[start : start + CHECK_BATCH].float().cpu()).float()
                          for start in range(0, len(images), CHECK_BATCH)])


def compare_predictions(reference: torch.Tensor, candidate: Predict, images: torch.Tensor) -> ExportCheck:
    """Top-1 agreement and the largest output difference of ``candidate`` against the reference outputs."""
    agree, worst = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(images), CHECK_BATCH):
            batch = images[start : start + CHECK_BATCH].float().cpu()
            expected = reference[start : start + CHECK_BATCH]
            got = torch.as_tensor(candidate(batch)).float()
            if got.shape != expected.shape:
                raise ValueError(f"the export answers shape {list(got.shape)}, the model {list(expected.shape)}")
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            worst = max(worst, float((got - expected).abs().max()))
    return ExportCheck(images=len(images), agreement=agree / max(1, len(images)), max_abs_diff=worst)


def _export_and_check(
    fmt: str, path: Path, defended: DefendedModel, images: torch.Tensor, write: Callable[[], Predict],
    expected: torch.Tensor | None, *, deprecated: bool = False,
) -> ExportedModel:
    """Run ``write`` (export + reload) and check it against ``expected`` (the in-memory model's outputs, computed
    here when not given); any failure becomes the format's ``error``, not an exception."""
    _require_check_images(images)
    if expected is None:
        expected = model_outputs(_cpu_eval(defended), images)
    try:
        reloaded = write()
        check = compare_predictions(expected, reloaded, images)
    except Exception as exc:  # noqa: BLE001 -- a format the model cannot take is reported, not fatal
        log.warning("export to %s failed: %s", fmt, _first_line(exc))
        path.unlink(missing_ok=True)
        return ExportedModel(fmt, path.name, None, None, None, deprecated, f"{type(exc).__name__}: {_first_line(exc)}")
    error = None if check.passed else (
        f"the reloaded {fmt} model agrees with the defended model on {check.agreement:.2%} of "
        f"{check.images} images (max log-probability difference {check.max_abs_diff:.3g})"
    )
    log.info("exported %s: agreement %.4f, max diff %.3g", path.name, check.agreement, check.max_abs_diff)
    return ExportedModel(fmt, path.name, path, sha256_file(path), check, deprecated, error)


def _require_check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or len(images) == 0:
        raise ValueError("export checks need a non-empty batch of images (N, C, H, W)")


def _holds_torchscript(defended: nn.Module) -> bool:
    """An uploaded TorchScript model inside the defended one: ``torch.export`` (and so ONNX) cannot trace it."""
    return any(isinstance(module, torch.jit.ScriptModule) for module in defended.modules())


def _not_exportable(fmt: str, path: Path) -> ExportedModel:
    reason = ("the audited model was uploaded as TorchScript, which torch.export cannot re-export; "
              "audit a .pt2 or safetensors checkpoint to get this format")
    log.info("no %s export: %s", fmt, reason)
    return ExportedModel(fmt, path.name, None, None, None, error=reason)


def _onnxruntime_predictor(path: Path) -> Predict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: graph-optimiser notes are not for users
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _cpu_eval(defended: nn.Module) -> nn.Module:
    return defended.eval().cpu()


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """The dynamo exporter prints its steps to stdout and logs onnxscript notes; keep the CLI's output clean."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
