"""Training REFINE's input transformation T against a frozen model f.

Only T learns. Every epoch ends with a checkpoint (T, optimizer, schedule,
history, mapping, config); a run restarted with the same checkpoint folder
resumes after the last finished epoch and ends exactly where an uninterrupted
run ends, because each epoch's data order and augmentation come from a
generator seeded by (seed, epoch) rather than from global RNG state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from auditor.data import ImageSet, take
from auditor.models import UNet
from auditor.refine.config import RefineConfig
from auditor.refine.losses import fit_loss, supcon_loss
from auditor.refine.remap import derangement, inverse
from auditor.runtime import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress, save_atomically
from auditor.training import autocast, channels_last_if_accepted, warmup_cosine, weights_channels_last
from auditor.transforms import random_grayscale, random_hflip, random_resized_crop

CHECKPOINT_NAME = "refine_checkpoint.pt"
EpochFn = Callable[[dict[str, float]], None]
#: (epochs finished, T) -> None; may update the frozen model in place (black-box audits refit their surrogate)
AdaptFn = Callable[[int, nn.Module], None]


@dataclass
class RefineResult:
    transform: UNet
    mapping: torch.Tensor  # pi: defended label for f's label j is mapping[j]
    config: RefineConfig
    seed: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _augment(x: torch.Tensor, config: RefineConfig, gen: torch.Generator) -> torch.Tensor:
    if not config.augment:
        return x
    x = random_resized_crop(x, gen, (0.8, 1.0))
    if config.hflip:
        x = random_hflip(x, gen)
    return random_grayscale(x, gen, 0.2)


def _overlay(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """``x`` blended with its batch rolled by one, each image at its own weight in [0, strength) (RefineConfig.overlay)."""
    if strength <= 0:
        return x
    alpha = (torch.rand(len(x), 1, 1, 1, generator=gen) * strength).to(x.device, x.dtype)
    return torch.lerp(x, x.roll(1, dims=0), alpha)


def _make_optimizer(params, config: RefineConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(config: RefineConfig, total_steps: int) -> Callable[[int], float]:
    warmup = max(1, int(config.warmup_epochs * total_steps / config.epochs))
    if config.schedule != "step":
        return warmup_cosine(total_steps, warmup, config.schedule)

    def step_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.step_gamma ** sum(progress >= m for m in config.step_milestones)

    return step_factor


def _layout(config: RefineConfig) -> torch.memory_format:
    """T's layout; f trains channels-last too when its forward allows (``channels_last_if_accepted``): its
    max-pools on contiguous activations were 17% of a train step (bench/results/audit_cost_1ce7a9f.json's profile)."""
    return torch.channels_last if config.channels_last else torch.contiguous_format


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_refine(
    model: nn.Module,
    pool: ImageSet,
    config: RefineConfig,
    *,
    num_classes: int,
    device: torch.device,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    on_progress: ProgressFn = no_progress,
    on_epoch: EpochFn | None = None,
    should_cancel: CancelFn = never_cancel,
    stop_after_epochs: int | None = None,
    adapt_model: AdaptFn | None = None,
) -> RefineResult:
    """Train T so that M(f(T(x))) reproduces f(x) on unlabeled images.

    ``stop_after_epochs`` ends the run early (as a crash would) and exists for
    resume tests and time-boxed runs. ``adapt_model`` runs after every epoch,
    before its checkpoint: a black-box audit uses it to refit its surrogate on the
    API's answers to the current T(x), so T keeps training against a model that
    is accurate where T actually takes the images.
    """
    started = time.perf_counter()
    model = freeze(model.to(device))
    data = take(pool, config.pool_size, seed)
    mapping = derangement(num_classes, seed if config.mapping_seed is None else config.mapping_seed)
    inv = inverse(mapping).to(device)
    torch.manual_seed(seed)
    transform = UNet(config.unet).to(device, memory_format=_layout(config))
    optimizer = _make_optimizer(transform.parameters(), config)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total_steps))
    history: list[dict[str, float]] = []
    start_epoch = _resume(checkpoint_dir, config, transform, optimizer, scheduler, history, mapping)
    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    came_channels_last = weights_channels_last(model)
    example = data.x[:2].to(device).float().div_(255)
    try:
        if config.channels_last:
            channels_last_if_accepted(model, example)
        targets = _pool_logits(model, data, config, device)
        for epoch in range(start_epoch, last_epoch):
            stats = _train_epoch(
                transform, model, data, targets, config, inv, optimizer, scheduler, device,
                _epoch_generator(seed, epoch),
                lambda done: on_progress("refine", epoch * steps_per_epoch + done, total_steps), should_cancel,
            )
            stats["epoch"] = epoch + 1
            if adapt_model is not None:
                adapt_model(epoch + 1, transform)  # refits the surrogate, which leaves it contiguous
                freeze(model)
                if config.channels_last:
                    channels_last_if_accepted(model, example)
                if epoch + 1 < last_epoch:  # f changed, and with it every target
                    targets = _pool_logits(model, data, config, device)
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            if checkpoint_dir is not None:
                _save_checkpoint(Path(checkpoint_dir), epoch + 1, config, transform, optimizer, scheduler, history,
                                 mapping)
    finally:  # the caller's model as it came
        model.to(memory_format=torch.channels_last if came_channels_last else torch.contiguous_format)
    transform.to(memory_format=torch.contiguous_format).eval()
    return RefineResult(transform, mapping, config, seed, history, time.perf_counter() - started, start_epoch)


def _pool_logits(model: nn.Module, data: ImageSet, config: RefineConfig, device: torch.device,
                 batch_size: int = 512) -> torch.Tensor | None:
    """f's logits on every pool image, the targets T is fitted to, when they are the same in every epoch.

    Without augmentation f sees the same images each epoch, so one pass over the pool replaces a forward pass of f
    in every step of every epoch (bench/results/audit_cost_pool_logits.json measures it). The logits are the
    ones the step would compute (same dtype, layout and autocast): on the CPU to the bit, as an image's answer does
    not depend on the batch it comes in, so T trains exactly as before (T's weights compared in bf16 and fp32, with
    and without the overlay). With augmentation each epoch draws new crops: None, and the step computes them.
    """
    if config.augment:
        return None
    with torch.no_grad(), autocast(device, config.bf16):
        return torch.cat([model(xb.to(device).contiguous(memory_format=_layout(config))).float()
                          for xb, _ in data.batches(batch_size)])


def _train_epoch(
    transform: UNet,
    model: nn.Module,
    data: ImageSet,
    targets: torch.Tensor | None,
    config: RefineConfig,
    inv: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    gen: torch.Generator,
    report: Callable[[int], None],
    should_cancel: CancelFn,
) -> dict[str, float]:
    transform.train()
    started = time.perf_counter()
    order = torch.randperm(len(data), generator=gen)
    sums = {"loss": 0.0, "fit": 0.0, "supcon": 0.0, "fidelity": 0.0}
    seen = 0
    for step, start in enumerate(range(0, len(data), config.batch_size), 1):
        check_cancel(should_cancel)
        picked = order[start : start + config.batch_size]
        xb = data.x[picked].to(device).float().div_(255)
        xb = _augment(xb, config, gen).contiguous(memory_format=_layout(config))
        if targets is not None:
            logits_clean = targets[picked.to(targets.device)]
        else:
            with torch.no_grad(), autocast(device, config.bf16):
                logits_clean = model(xb).float()
        with autocast(device, config.bf16):
            transformed = transform(_overlay(xb, config.overlay, gen).contiguous(memory_format=_layout(config)))
            logits_t = model(transformed).float()
        fit = fit_loss(config.loss, logits_t, logits_clean, inv, config.kd_temperature)
        pseudo = logits_clean.argmax(1)
        contrast = supcon_loss(transformed, pseudo, config.supcon_temperature) if config.supcon_weight else fit * 0
        loss = fit + config.supcon_weight * contrast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(xb)
        seen += n
        sums["loss"] += loss.item() * n
        sums["fit"] += fit.item() * n
        sums["supcon"] += contrast.item() * n
        sums["fidelity"] += (logits_t.index_select(1, inv).argmax(1) == pseudo).sum().item()
        report(step)
    stats = {k: v / seen for k, v in sums.items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["seconds"] = time.perf_counter() - started
    return stats


def _save_checkpoint(directory: Path, epoch: int, config: RefineConfig, transform: UNet, optimizer, scheduler, history, mapping) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "epoch": epoch,
        "config": config.to_dict(),
        "transform": transform.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": scheduler.last_epoch},
        "history": history,
        "mapping": mapping,
    }
    save_atomically(payload, directory / CHECKPOINT_NAME)


def _resume(directory, config, transform, optimizer, scheduler, history, mapping) -> int:
    """Load the last epoch checkpoint when it belongs to this exact configuration; return its epoch."""
    if directory is None or not (Path(directory) / CHECKPOINT_NAME).exists():
        return 0
    payload: dict[str, Any] = torch.load(Path(directory) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    if payload["config"] != config.to_dict() or not torch.equal(payload["mapping"], mapping):
        return 0  # a different run's checkpoint: start afresh rather than mix them
    transform.load_state_dict(payload["transform"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.last_epoch = payload["scheduler"]["last_epoch"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    history.extend(payload["history"])
    return int(payload["epoch"])
