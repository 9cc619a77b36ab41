"""Stage ``refine``: train T (and fix M) around the submitted model, or through its surrogate.

What ships: a checkpoint audit gets one TorchScript file wrapping T, the model and
M (``defended_model.pt``); an API audit gets T and M (``transform.safetensors``,
``defense.json``) to put around the real API, which ``load_api_defense`` reads back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from auditor.data import ImageSet
from auditor.models import UNet, UNetConfig
from auditor.pipeline.plan import AuditPlan
from auditor.pipeline.state import AuditState, MetricsFn
from auditor.pipeline.surrogate import save_surrogate, surrogate_refitter
from auditor.refine import DefendedModel, RefineConfig, export_defended, train_refine
from auditor.runtime import CancelFn, ProgressFn

log = logging.getLogger(__name__)

TRANSFORM_FILE, DEFENSE_FILE, DEFENDED_MODEL_FILE = "transform.safetensors", "defense.json", "defended_model.pt"


def refine_config(plan: AuditPlan) -> RefineConfig:
    """The plan's REFINE numbers as the trainer's config (the same for the submitted model and every control)."""
    r = plan.refine
    return RefineConfig(
        unet=UNetConfig(in_channels=plan.data.image_shape[0], width=r.unet_width), epochs=r.epochs,
        pool_size=r.pool_images, loss=r.loss, bf16=plan.bf16, batch_size=r.batch_size,
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
    meta = {"mapping": result.mapping.tolist(), "refine_config": result.config.to_dict(), "seed": result.seed}
    transform_path = state.out / TRANSFORM_FILE
    weights = {k: v.detach().cpu().contiguous() for k, v in result.transform.state_dict().items()}
    save_file(weights, str(transform_path), metadata={"refine": json.dumps(meta)})
    state.add_artifact(TRANSFORM_FILE, transform_path, "transform", "application/octet-stream")
    config_path = state.out / DEFENSE_FILE
    config_path.write_text(json.dumps(meta, indent=2))
    state.add_artifact(DEFENSE_FILE, config_path, "transform", "application/json")
    if state.spec.model.source == "checkpoint":
        defended = DefendedModel(result.transform, state.model, result.mapping)
        path = export_defended(defended, state.test.x[:2].float() / 255, state.out / DEFENDED_MODEL_FILE)
        defended.to(state.device)
        state.add_artifact(DEFENDED_MODEL_FILE, path, "defended_model", "application/octet-stream")


def load_api_defense(out_dir: Path) -> tuple[UNet, torch.Tensor]:
    """T and M of an API audit, from its artifacts: put them around the API as ``M ∘ API ∘ T``.

    ``auditor.blackbox.defended_api_predictor(api, transform, mapping)`` serves predictions through them.
    """
    meta = json.loads((Path(out_dir) / DEFENSE_FILE).read_text())
    unet = UNetConfig(**meta["refine_config"]["unet"])
    transform = UNet(unet)
    transform.load_state_dict(load_file(str(Path(out_dir) / TRANSFORM_FILE)))
    return transform.eval(), torch.tensor(meta["mapping"], dtype=torch.long)
