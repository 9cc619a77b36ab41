"""REFINE settings; defaults are tuned for 28x28 inputs on a CPU (see bench/ and README)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from auditor.models import UNetConfig

LOSSES = ("bce", "ce", "kd")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class RefineConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    epochs: int = 6  # the paper trains 150 GPU epochs; the benchmark shows a few suffice at 28x28
    batch_size: int = 128
    loss: str = "kd"  # bce: the authors' code; ce: the paper's text; kd: soft pseudo-labels (ours, see bench)
    kd_temperature: float = 2.0  # softens f's output for the kd loss; more dark knowledge at higher values
    supcon_weight: float = 0.1  # lambda in the paper
    supcon_temperature: float = 0.07
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.5  # linear warm-up keeps the first steps from scrambling T
    step_milestones: tuple[float, ...] = (0.67, 0.87)  # fractions of training, "step" schedule
    step_gamma: float = 0.1
    augment: bool = False  # crop/flip/grayscale as the authors do; off: measured to cost fidelity on 28x28 (bench/)
    hflip: bool = False  # off for Fashion-MNIST-like data where orientation is class evidence
    #: Blend each of T's training inputs with another image of its batch, at a weight drawn up to this, while f's
    #: answer on the unblended image stays the target: T learns to see through a faint full-image overlay, the
    #: shape of a Blended trigger. 0 = off, at every effort level: on the seven-attack benchmark 0.2 took Blended's
    #: residual ASR from 6.9% to 1.6-1.8% but BATT's from 1.8-2.8% to 3.3-5.0%, and cost 0.2 points of BA on
    #: average (README, bench/results/refine_levers_overlay/ and refine_levers_cl/), so it is a spec option.
    overlay: float = 0.0
    pool_size: int | None = 20_000  # unlabeled images used; None = the whole pool
    bf16: bool = False  # autocast; measured in bench/, off by default for exact CPU reproducibility
    #: Train T in channels-last layout: oneDNN's convolutions skip a reorder per layer. One train step at width 16,
    #: batch 128, one thread: 1.2x faster with bf16 autocast (bench/results/refine_step.json); T is handed back
    #: in the default layout, so exports and inference see no difference.
    channels_last: bool = True
    mapping_seed: int | None = None  # None = derive from the run seed

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("epochs >= 1, batch_size >= 2 and lr > 0 are required")
        if self.supcon_weight < 0 or self.supcon_temperature <= 0 or self.kd_temperature <= 0:
            raise ValueError("loss weights and temperatures must be positive")
        if not 0.0 <= self.overlay <= 0.5:
            raise ValueError("overlay must be between 0 and 0.5")
        if self.pool_size is not None and self.pool_size < self.batch_size:
            raise ValueError("pool_size must hold at least one batch")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["unet"] = self.unet.to_dict()
        out["step_milestones"] = list(self.step_milestones)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RefineConfig":
        values = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if isinstance(values.get("unet"), dict):
            values["unet"] = UNetConfig(**values["unet"])
        if "step_milestones" in values:
            values["step_milestones"] = tuple(values["step_milestones"])
        return cls(**values)
