"""Supervised training of classifiers: backdoored reference models and surrogates share it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from auditor.runtime import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress

#: (float batch in [0, 1] on the device, dataset indices of the batch) -> augmented batch
Augment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Called after every optimizer step with the number of steps taken; True starts the cool-down (early stopping).
StopFn = Callable[[int], bool]


@dataclass(frozen=True)
class TrainConfig:
    """Defaults train the small CNN to ~91% on Fashion-MNIST in a few CPU minutes."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3  # AdamW, warm-up then cosine decay: converges in few epochs
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    bf16: bool = False  # autocast on CPUs with avx512_bf16; off by default for exact reproducibility
    # Train in channels-last: a 1-channel image is laid out alike either way, so the weights decide, and
    # contiguous weights send every max-pool down PyTorch's slow NCHW path. A standard positive control trained
    # in 32.9 s instead of 52.2 s (bench/results/audit_cost*.json); the weights are handed back contiguous.
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


def warmup_cosine(total_steps: int, warmup_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """LR factor per step: linear warm-up (large first steps scramble a fresh net), then cosine or flat."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def channels_last_if_accepted(model: nn.Module, example: torch.Tensor) -> bool:
    """Move ``model``'s weights to channels-last if its forward still runs on ``example`` that way; True if so.

    Why: a 1-channel image is laid out alike either way, so the weights decide the activations' layout, and on
    contiguous ones PyTorch's CPU max-pool is 6-10x slower (a small CNN infers 1.9x faster channels-last). A
    submitted model is a program, though: ``x.view(n, -1)`` after a convolution, common in user code and frozen
    into traced TorchScript, fails on channels-last activations, so such a model stays as it came.
    """
    model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model(example.contiguous(memory_format=torch.channels_last))
    except Exception:  # noqa: BLE001 -- whatever the model cannot do channels-last, it does as it came
        model.to(memory_format=torch.contiguous_format)
        return False
    return True


def weights_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are laid out channels-last (a single-channel kernel is both)."""
    return any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where it pays (CPU with avx512_bf16, or CUDA); a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    augment: Augment | None = None,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "train",
    stop: StopFn | None = None,
    cooldown_share: float = 1.0,
) -> list[dict[str, float]]:
    """Train on uint8 images ``x`` with hard labels (N,) or soft targets (N, K); returns per-epoch stats.

    ``augment`` runs on each float batch in [0, 1] on the device with the batch's
    dataset indices, so poisoning recipes that treat poisoned and clean samples
    differently (PhysicalBA, BATT) plug in here. ``stop`` may end training before
    ``config.epochs``: the schedule spans all of them (the steps up to a stop are
    those of the full run), so when ``stop`` says so the learning rate is instead
    brought linearly from where it is to zero over ``cooldown_share`` of the steps
    taken, and training ends there. A stop in the warm-up or early cosine phase finds
    the learning rate near its peak, where accuracy is noisy and well below what the
    decay reaches; the short decay recovers most of it (a warmup-stable-decay schedule).
    The last history entry's ``steps`` says how many steps ran.
    """
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    try:
        return _train_epochs(model, x, targets, config, device, seed, should_cancel, on_progress, stage, augment,
                             stop, cooldown_share)
    finally:  # contiguous again: safetensors and TorchScript export expect it, and so does any caller
        model.to(memory_format=torch.contiguous_format).eval()


def _train_epochs(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, config: TrainConfig,
                  device: torch.device, seed: int, should_cancel: CancelFn, on_progress: ProgressFn, stage: str,
                  augment: Augment | None, stop: StopFn | None,
                  cooldown_share: float) -> list[dict[str, float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = _Stoppable(warmup_cosine(total, warmup_steps=max(1, total // 4)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    history, step, stopped = [], 0, False
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        for start in range(0, len(x), config.batch_size):
            check_cancel(should_cancel)
            idx = order[start : start + config.batch_size]
            xb = x[idx].to(device).float().div_(255)
            tb = targets[idx].to(device)
            if augment is not None:
                xb = augment(xb, idx)
            with autocast(device, config.bf16):
                logits = model(xb)
            loss = _loss(logits.float(), tb, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            hard = tb if tb.dim() == 1 else tb.argmax(1)
            correct += (logits.argmax(1) == hard).sum().item()
            step += 1
            on_progress(stage, step, total)
            if stop is not None and schedule.end is None and stop(step):
                schedule.cool_down(step, max(1, round(cooldown_share * step)))
            if schedule.end is not None and step >= schedule.end:
                stopped = True
                break
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen, "steps": step})
        if stopped:
            break
    return history


class _Stoppable:
    """A learning-rate factor that follows ``base`` until ``cool_down``, then falls linearly to zero."""

    def __init__(self, base: Callable[[int], float]):
        self.base = base
        self.start: int | None = None
        self.end: int | None = None

    def cool_down(self, step: int, steps: int) -> None:
        self.start, self.end = step, step + steps

    def __call__(self, step: int) -> float:
        if self.start is None or self.end is None:
            return self.base(step)
        return self.base(self.start) * max(0.0, (self.end - step) / (self.end - self.start))


def _loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8 or float [0, 1] images, in order, every image included."""
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
        outs.append(model(xb).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
