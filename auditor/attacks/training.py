"""Training backdoored reference models (positive controls and benchmark subjects)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from auditor.attacks.base import Attack, AttackConfig, PoisonedTrainSet
from auditor.attacks.catalog import build_attack
from auditor.data import ImageSet
from auditor.models import ArchConfig, Classifier, build_classifier, save_classifier
from auditor.runtime import CancelFn, ProgressFn, never_cancel, no_progress
from auditor.training import TrainConfig, train_classifier


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
) -> BackdooredModel:
    """Poison ``train`` with ``attack``, train ``arch`` on it, and trigger ``test``.

    ``clean_model`` is only needed by attacks that perturb against a clean model
    (label-consistent); one is trained here when missing.
    """
    started = time.perf_counter()
    if isinstance(attack, AttackConfig):
        attack = build_attack(attack, train.shape)
    if attack.name == "lc" and clean_model is None:
        clean_model, _ = train_clean_model(arch, train, config, device=device, seed=seed + 1, should_cancel=should_cancel)
    poisoned = attack.poison(train, clean_model)
    torch.manual_seed(seed)
    model = build_classifier(arch)
    history = train_classifier(
        model, poisoned.x, poisoned.y, config, device=device, seed=seed,
        augment=_attack_augment(attack, poisoned, seed), on_progress=on_progress,
        should_cancel=should_cancel, stage="train_backdoor",
    )
    return BackdooredModel(
        model=model, arch=arch, attack=attack, poisoned_test=attack.triggered_test(test),
        poisoned_count=poisoned.poisoned_count, history=history, train_seconds=time.perf_counter() - started,
    )


def _attack_augment(attack: Attack, poisoned: PoisonedTrainSet, seed: int):
    if type(attack).augment is Attack.augment:
        return None
    gen = torch.Generator().manual_seed(seed + 101)

    def augment(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return attack.augment(xb, poisoned.poisoned[idx], gen)

    return augment
