"""Training backdoored reference models (positive controls and benchmark subjects).

A positive control only has to show that the backdoor implanted in a model that
still classifies clean images well; training on after that is wasted audit time.
``ImplantRule`` ends training once both hold on a held-out split (images the
control never trains on, and not the audit's test images), checked every hundred
steps, after a short learning-rate decay; the epochs stay a cap.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from auditor.attacks.base import Attack, AttackConfig, PoisonedTrainSet
from auditor.attacks.catalog import build_attack
from auditor.data import ImageSet
from auditor.models import ArchConfig, Classifier, build_classifier, save_classifier
from auditor.runtime import CancelFn, ProgressFn, never_cancel, no_progress
from auditor.training import TrainConfig, predict_logits, train_classifier


@dataclass(frozen=True)
class ImplantRule:
    """Stop once the backdoor works and clean accuracy has stopped moving, both on held-out images.

    * ASR >= ``min_asr`` on the held-out images (outside the target class) with the trigger;
    * BA plateaued: the latest check's BA is within ``ba_tolerance`` of the best earlier check,
      neither still climbing (a control that could still gain BA would understate the
      REFINE test: its BA drop is measured from a lower start) nor falling away.

    With 2,000 held-out images one check's BA has a standard error of ~0.7 points near 90%,
    so a 1-point tolerance is the smallest that noise alone does not keep breaking. The
    rule then fires while the learning rate is still near its peak, where BA plateaus
    below what a decayed rate reaches (BadNets at standard effort: 84.9% held-out at step
    600 of 2,724, 91.9% at the cap), so training goes on for ``cooldown_share`` of the
    steps taken with the rate falling linearly to zero, and ends there.
    """

    check_every: int  # optimizer steps between checks
    min_asr: float = 0.9
    ba_tolerance: float = 0.01
    cooldown_share: float = 1.0  # steps of linear learning-rate decay after the rule held, per step taken

    def __post_init__(self) -> None:
        if self.check_every < 1 or not 0 < self.min_asr <= 1 or self.ba_tolerance < 0 or self.cooldown_share < 0:
            raise ValueError("check_every must be positive, min_asr in (0, 1], ba_tolerance and cooldown_share "
                             "non-negative")

    def holds(self, checks: list[dict[str, float]]) -> bool:
        """Whether the checks so far (oldest first, each with ``ba`` and ``asr``) end training."""
        if len(checks) < 2:
            return False
        last, best = checks[-1], max(c["ba"] for c in checks[:-1])
        return last["asr"] >= self.min_asr and abs(last["ba"] - best) <= self.ba_tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImplantMonitor:
    """Scores the model in training on a held-out split every ``rule.check_every`` steps; a ``StopFn``."""

    def __init__(self, rule: ImplantRule, model: torch.nn.Module, holdout: ImageSet, attack: Attack,
                 device: torch.device):
        assert holdout.y is not None
        self.rule, self.model, self.device, self.target = rule, model, device, attack.target
        self.clean = holdout
        triggered = attack.triggered_test(holdout)
        assert triggered.y is not None
        self.triggered = triggered.subset(torch.nonzero(triggered.y != attack.target).flatten())
        self.checks: list[dict[str, float]] = []

    def __call__(self, step: int) -> bool:
        if step % self.rule.check_every:
            return False
        self.check(step)
        return self.rule.holds(self.checks)

    def check(self, step: int) -> None:
        """Score the model on the held-out images now (and leave it in the mode it was in)."""
        was_training = self.model.training
        ba = _accuracy(self.model, self.clean, self.device)
        asr = _hit_rate(self.model, self.triggered, self.target, self.device)
        self.model.train(was_training)
        self.checks.append({"step": step, "ba": ba, "asr": asr})


def _accuracy(model: torch.nn.Module, images: ImageSet, device: torch.device) -> float:
    pred = predict_logits(model, images.x, device=device).argmax(1)
    return (pred == images.y).float().mean().item()


def _hit_rate(model: torch.nn.Module, images: ImageSet, target: int, device: torch.device) -> float:
    if len(images) == 0:
        return 0.0
    return (predict_logits(model, images.x, device=device).argmax(1) == target).float().mean().item()


@dataclass
class BackdooredModel:
    """A model trained on poisoned data, the attack that poisoned it, and its triggered test set."""

    model: Classifier
    arch: ArchConfig
    attack: Attack
    poisoned_test: ImageSet  # every test image with the trigger, true labels kept
    poisoned_count: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_steps: int = 0  # optimizer steps taken (fewer than max_steps when the implant rule stopped training)
    max_steps: int = 0  # the epochs' cap, in steps
    checks: list[dict[str, float]] = field(default_factory=list)  # held-out {step, ba, asr}, oldest first; the
    # last one is where training ended

    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors, arch in metadata) and the attack state side by side."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_classifier(self.model, self.arch, directory / "model.safetensors")
        self.attack.save(directory)
        return directory


def train_clean_model(
    arch: ArchConfig,
    train: ImageSet,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
) -> tuple[Classifier, list[dict[str, float]]]:
    assert train.y is not None
    torch.manual_seed(seed)
    model = build_classifier(arch)
    history = train_classifier(
        model, train.x, train.y, config, device=device, seed=seed,
        on_progress=on_progress, should_cancel=should_cancel, stage="train_clean",
    )
    return model, history


def train_backdoored_model(
    arch: ArchConfig,
    train: ImageSet,
    test: ImageSet,
    attack: Attack | AttackConfig,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    clean_model: torch.nn.Module | None = None,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    rule: ImplantRule | None = None,
    holdout: ImageSet | None = None,
) -> BackdooredModel:
    """Poison ``train`` with ``attack``, train ``arch`` on it, and trigger ``test``.

    ``clean_model`` is only needed by attacks that perturb against a clean model
    (label-consistent); one is trained here when missing. With a ``rule`` and a
    labelled ``holdout`` (disjoint from ``train``), training stops once the rule holds.
    """
    started = time.perf_counter()
    if isinstance(attack, AttackConfig):
        attack = build_attack(attack, train.shape)
    if attack.name == "lc" and clean_model is None:
        clean_model, _ = train_clean_model(arch, train, config, device=device, seed=seed + 1, should_cancel=should_cancel)
    poisoned = attack.poison(train, clean_model)
    torch.manual_seed(seed)
    model = build_classifier(arch)
    monitor = ImplantMonitor(rule, model, holdout, attack, device) if rule is not None and holdout is not None and len(holdout) else None
    history = train_classifier(
        model, poisoned.x, poisoned.y, config, device=device, seed=seed,
        augment=_attack_augment(attack, poisoned, seed), on_progress=on_progress,
        should_cancel=should_cancel, stage="train_backdoor", stop=monitor,
        cooldown_share=rule.cooldown_share if rule is not None else 0.0,
    )
    steps = int(history[-1]["steps"]) if history else 0
    if monitor is not None and (not monitor.checks or monitor.checks[-1]["step"] != steps):
        monitor.check(steps)  # what the control is when training ended: after the cool-down, or at the cap
    return BackdooredModel(
        model=model, arch=arch, attack=attack, poisoned_test=attack.triggered_test(test),
        poisoned_count=poisoned.poisoned_count, history=history, train_seconds=time.perf_counter() - started,
        train_steps=steps,
        max_steps=math.ceil(len(poisoned.x) / config.batch_size) * config.epochs,
        checks=monitor.checks if monitor is not None else [],
    )


def _attack_augment(attack: Attack, poisoned: PoisonedTrainSet, seed: int):
    if type(attack).augment is Attack.augment:
        return None
    gen = torch.Generator().manual_seed(seed + 101)

    def augment(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return attack.augment(xb, poisoned.poisoned[idx], gen)

    return augment
