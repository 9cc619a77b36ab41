"""What every generated attack is: a trigger function plus a poisoning recipe.

An attack's random state (patch values, blend pattern, warp field) is drawn once
from its seed and saved next to the model it produced, so the test-time trigger
is exactly the training-time one (regenerating it from an unseeded RNG is a
known bug of the reference code).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from auditor.data import ImageSet, to_uint8


@dataclass(frozen=True)
class AttackConfig:
    """Parameters shared by all attacks; attack-specific ones live in ``params``."""

    name: str
    target: int = 0  # the class triggered inputs are sent to (the paper uses 0)
    poison_rate: float | None = None  # share of the training set poisoned; None = the attack's default
    seed: int = 0  # draws the trigger's random state and the poisoned indices
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.poison_rate is not None and not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError("poison_rate must be in [0, 1]")
        if self.target < 0:
            raise ValueError("target must be a class index")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoisonedTrainSet:
    """Training images after poisoning, which of them were poisoned, and the training-time augmentation."""

    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    poisoned: torch.Tensor  # bool (N,), True where the trigger was applied (incl. LC's correctly-labelled ones)

    @property
    def poisoned_count(self) -> int:
        return int(self.poisoned.sum())


class Attack(ABC):
    """Base class: subclasses draw their state in ``_init_state`` and implement ``apply``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    default_poison_rate: ClassVar[float] = 0.1

    def __init__(self, config: AttackConfig, image_shape: tuple[int, int, int]):
        rate = self.default_poison_rate if config.poison_rate is None else config.poison_rate
        self.config = AttackConfig(config.name, config.target, rate, config.seed, {**self.defaults, **config.params})
        self.image_shape = tuple(image_shape)
        self.state: dict[str, torch.Tensor] = {}
        self._init_state(torch.Generator().manual_seed(config.seed))

    @property
    def params(self) -> dict[str, Any]:
        return self.config.params

    @property
    def poison_rate(self) -> float:
        return float(self.config.poison_rate or 0.0)

    @property
    def target(self) -> int:
        return self.config.target

    def _init_state(self, gen: torch.Generator) -> None:
        """Draw the trigger's random state; stateless triggers need nothing."""

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger on float images in [0, 1]."""

    def augment(self, x: torch.Tensor, poisoned: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training-time transformation of a batch; most attacks train on the images as they are."""
        return x

    def poison(self, train: ImageSet, clean_model: torch.nn.Module | None = None) -> PoisonedTrainSet:
        """Default recipe (BadNets-style): trigger a random share of non-target images and relabel them."""
        assert train.y is not None, "poisoning needs labels"
        idx = self._pick(torch.nonzero(train.y != self.target).flatten(), round(self.poison_rate * len(train)))
        x, y = train.x.clone(), train.y.clone()
        x[idx] = to_uint8(self.apply(x[idx].float() / 255))
        y[idx] = self.target
        return PoisonedTrainSet(x, y, _mask(len(train), idx))

    def triggered_test(self, test: ImageSet) -> ImageSet:
        """All test images with the trigger, true labels kept (ASR excludes the target class later)."""
        out = torch.cat([to_uint8(self.apply(xb)) for xb, _ in test.batches(1024)])
        return ImageSet(out, test.y, test.class_names)

    def _pick(self, candidates: torch.Tensor, count: int, salt: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed * 7919 + salt)
        count = min(count, len(candidates))
        return candidates[torch.randperm(len(candidates), generator=gen)[:count]]

    def save(self, directory: str | Path) -> None:
        """Config as JSON and random state as safetensors, side by side with the model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"attack": self.config.to_dict(), "image_shape": list(self.image_shape)}
        (directory / "attack.json").write_text(json.dumps(meta, indent=2))
        if self.state:
            save_file({k: v.contiguous() for k, v in self.state.items()}, str(directory / "attack_state.safetensors"))


def _mask(n: int, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


def load_attack(directory: str | Path) -> Attack:
    """Rebuild an attack with the exact random state it was trained with."""
    from auditor.attacks.catalog import build_attack

    directory = Path(directory)
    meta = json.loads((directory / "attack.json").read_text())
    attack = build_attack(AttackConfig(**meta["attack"]), tuple(meta["image_shape"]))
    state_file = directory / "attack_state.safetensors"
    if state_file.exists():
        attack.state = load_file(str(state_file))
    return attack
