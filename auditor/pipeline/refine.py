"""Stage ``refine``: train T (and fix M) around the submitted model, or through its surrogate.

What ships: every audit gets T and M (``transform.safetensors``, ``defense.json`` with
the image shape and, for API audits, how the API is called), which
``auditor.deploy.load_defense`` reads back and ``refine-audit serve-defended`` puts
around the real API. A checkpoint audit also gets the defended model itself (T, the
model and M in one file) as a ``torch.export`` program, ONNX and TorchScript, each
reloaded and checked against the in-memory model on up to 2,000 of the audit's test images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from auditor.data import ImageSet
from auditor.models import UNetConfig
from auditor.pipeline.plan import AuditPlan
from auditor.pipeline.state import AuditState, MetricsFn
from auditor.pipeline.surrogate import save_surrogate, surrogate_refitter
from auditor.refine import DefendedModel, RefineConfig, export_defended_formats, train_refine
from auditor.runtime import CancelFn, ProgressFn
from auditor.training import weights_channels_last

log = logging.getLogger(__name__)

TRANSFORM_FILE, DEFENSE_FILE = "transform.safetensors", "defense.json"
#: Test images each exported file is compared on. A conversion that changes the program shows on any image, and all
#: 10,000 of Fashion-MNIST's took 19-23 s of a 290 s warm audit on a bf16 CPU, for TorchScript alone (the audit logs
#: beside bench/results/audit_cost_pool_logits.json); a weights-only upload is exported in three formats.
EXPORT_CHECK_IMAGES = 2_000


def refine_config(plan: AuditPlan) -> RefineConfig:
    """The plan's REFINE numbers as the trainer's config (the same for the submitted model and every control)."""
    r = plan.refine
    return RefineConfig(
        unet=UNetConfig(in_channels=plan.data.image_shape[0], width=r.unet_width), epochs=r.epochs,
        pool_size=r.pool_images, loss=r.loss, overlay=r.overlay, bf16=plan.bf16, batch_size=r.batch_size,
    )


def stage_refine(state: AuditState, on_progress: ProgressFn, should_cancel: CancelFn,
                 on_metrics: MetricsFn | None) -> None:
    config = refine_config(state.plan)

    def on_epoch(stats: dict[str, float]) -> None:
        log.info("refine epoch %d: %s", stats["epoch"], {k: round(v, 4) for k, v in stats.items()})
        if on_metrics is not None:
            on_metrics("refine", {**stats, "epochs": config.epochs})

    checkpoint_dir = Path(state.inputs.work_dir) / "refine"
    refitter = surrogate_refitter(state, config.epochs, checkpoint_dir, should_cancel)
    state.refine = train_refine(
        state.model, ImageSet(state.pool.x, None), config, num_classes=state.num_classes, device=state.device,
        seed=state.spec.seed, checkpoint_dir=checkpoint_dir, on_progress=on_progress, on_epoch=on_epoch,
        should_cancel=should_cancel, adapt_model=refitter,
    )
    if refitter is not None and refitter.rounds:
        save_surrogate(state)
        state.sections["surrogate"]["refits"] = refitter.rounds
    _save_defense(state)


def _save_defense(state: AuditState) -> None:
    result = state.refine
    meta = {"mapping": result.mapping.tolist(), "refine_config": result.config.to_dict(), "seed": result.seed,
            "image_shape": list(state.plan.data.image_shape), **_api_shape(state)}
    transform_path = state.out / TRANSFORM_FILE
    weights = {k: v.detach().cpu().contiguous() for k, v in result.transform.state_dict().items()}
    save_file(weights, str(transform_path), metadata={"refine": json.dumps(meta)})
    state.add_artifact(TRANSFORM_FILE, transform_path, "transform", "application/octet-stream")
    config_path = state.out / DEFENSE_FILE
    config_path.write_text(json.dumps(meta, indent=2))
    state.add_artifact(DEFENSE_FILE, config_path, "transform", "application/json")
    if state.spec.model.source == "checkpoint":
        _export_defended_model(state)


def export_check_images(images: torch.Tensor, limit: int = EXPORT_CHECK_IMAGES) -> torch.Tensor:
    """At most ``limit`` images, evenly spaced over the set: an upload sorted by class still gives every class."""
    if len(images) <= limit:
        return images
    return images[torch.linspace(0, len(images) - 1, limit).round().long()]


def _api_shape(state: AuditState) -> dict[str, object]:
    """How the audited API is called, so the defended endpoint can stand in front of it without the report."""
    api = state.spec.model.api
    if api is None:
        return {}
    output = state.api.output_kind if state.api is not None and state.api.output_kind != "unknown" else api.output
    return {"api": {"protocol": api.protocol, "model_name": api.model_name, "input_layout": api.input_layout,
                    "output": output, "batch_size": api.batch_size}}


def _export_defended_model(state: AuditState) -> None:
    """T, the model and M as one deployable file in each format, each reloaded and compared with
    the in-memory defended model on the check images (``export_check_images``); a format the model cannot take is
    reported."""
    came_channels_last = weights_channels_last(state.model)
    state.model.to(memory_format=torch.contiguous_format)  # plain weights in the files: torch.export warns on others
    defended = DefendedModel(state.refine.transform, state.model, state.refine.mapping)
    exports = export_defended_formats(defended, export_check_images(state.test.x).float() / 255, state.out)
    defended.to(state.device)  # the exporters leave it on the CPU
    if came_channels_last:
        state.model.to(memory_format=torch.channels_last)
    for exported in exports:
        if exported.path is not None:
            state.add_artifact(exported.name, exported.path, "defended_model", "application/octet-stream")
        if not exported.verified:
            log.warning("defended model export %s: %s", exported.format, exported.error or "check failed")
    state.sections["exports"] = [exported.to_report() for exported in exports]
