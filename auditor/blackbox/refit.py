"""Keep the surrogate accurate where REFINE takes the images: refits on the API's answers to T(x).

The surrogate is distilled on natural images, but REFINE's T moves images far
from them, and there the surrogate and the API can disagree: T then learns a
mapping that works on the surrogate and not through the real API. On
Fashion-MNIST (bench/blackbox_fmnist.py, 20,000 label-only queries) REFINE
through a surrogate distilled once lost 3.8 points of BA on BadNets, 6.4 on
Blended and 35.8 on WaNet, while the white-box defense lost at most 1.5.

So part of the query budget is kept back: after some REFINE epochs, pool images
are passed through the current T, the ones the surrogate is least sure about
are sent to the API, and the surrogate is fine-tuned on its original training
set plus every transformed image answered so far. T's later epochs train
against that refitted surrogate. The refit state (weights and the transformed
images with their answers) is saved after every round, so a resumed audit does
not pay for the same queries again. With 6,000 of the 20,000 queries spent this
way in 5 rounds, WaNet through a label-only API keeps BA at 87.8% (90.3%
undefended) instead of 54.9%; the surrogate agrees with the API on 51% of T's
images before the first refit and on 95% at the end (bench/results/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from auditor.blackbox.client import ModelAPI
from auditor.blackbox.defended import transform_images
from auditor.blackbox.surrogate import SurrogateResult, api_targets
from auditor.data import ImageSet, to_uint8
from auditor.pipeline.plan import REFIT_ROUNDS
from auditor.refine.defended import inference_transform
from auditor.runtime import CancelFn, check_cancel, never_cancel, save_atomically
from auditor.training import TrainConfig, predict_logits, train_classifier

log = logging.getLogger(__name__)

STATE_NAME = "surrogate_refit.pt"


@dataclass(frozen=True)
class RefitConfig:
    """How many queries to keep for transformed images, and when to spend them."""

    query_budget: int  # API queries on T(x) over the whole REFINE run (an audit's plan sets it)
    rounds: int = REFIT_ROUNDS  # refits, after evenly spaced REFINE epochs (never after the last one)
    epochs: int = 2  # fine-tuning epochs per refit, over the original and transformed images
    lr: float = 1e-3  # lower than distillation: adjust the surrogate, do not retrain it
    candidates_per_query: int = 4  # uncertainty sampling: look at this many transformed images per query
    soft_labels: bool = True  # as in DistillConfig
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.query_budget < 0 or self.rounds < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError("query_budget >= 0, rounds >= 1, epochs >= 1 and lr > 0 are required")
        if self.candidates_per_query < 1:
            raise ValueError("candidates_per_query must be at least 1")


def refit_epochs(refine_epochs: int, rounds: int) -> list[int]:
    """REFINE epochs after which to refit: evenly spread, the last epoch excluded (T must train after a refit)."""
    slots = list(range(1, refine_epochs))
    if len(slots) <= rounds:
        return slots
    step = len(slots) / rounds
    return sorted({slots[int(i * step)] for i in range(rounds)})


class SurrogateRefitter:
    """``train_refine``'s ``adapt_model`` hook for black-box audits (module docstring)."""

    def __init__(self, api: ModelAPI, surrogate: SurrogateResult, pool: ImageSet, refine_epochs: int,
                 config: RefitConfig, *, device: torch.device, seed: int, state_dir: str | Path | None = None,
                 should_cancel: CancelFn = never_cancel):
        self.api, self.surrogate, self.pool, self.config = api, surrogate, pool, config
        self.device, self.seed, self.should_cancel = device, seed, should_cancel
        self.schedule = refit_epochs(refine_epochs, config.rounds)
        self.state_path = None if state_dir is None else Path(state_dir) / STATE_NAME
        self.images = torch.empty(0, *pool.shape, dtype=torch.uint8)  # transformed images answered by the API
        self.targets = surrogate.train_targets[:0]
        self.done: list[int] = []  # epochs whose refit is finished
        self.rounds: list[dict[str, float]] = []
        self._load()

    @property
    def queries_used(self) -> int:
        return len(self.images)

    def __call__(self, epoch: int, transform: nn.Module) -> None:
        if epoch not in self.schedule or epoch in self.done:
            return
        check_cancel(self.should_cancel)
        images, targets = self._query_transformed(epoch, transform, self._round_budget())
        if len(images) == 0:
            return  # the budget is spent: T trains on against the surrogate as it is
        before = _agreement(self.surrogate.model, images, targets, self.device)
        self.images = torch.cat([self.images, images])
        self.targets = torch.cat([self.targets, targets])
        self._fine_tune(epoch)
        self.done.append(epoch)
        self.rounds.append({"epoch": epoch, "queries": len(images), "agreement_before": before,
                            "agreement_after": _agreement(self.surrogate.model, images, targets, self.device)})
        log.info("surrogate refit after REFINE epoch %d: %s", epoch, self.rounds[-1])
        self._save()

    def _round_budget(self) -> int:
        left_rounds = len([e for e in self.schedule if e not in self.done])
        budget = self.config.query_budget - self.queries_used
        remaining = getattr(self.api, "remaining_budget", None)
        if remaining is not None:
            budget = min(budget, int(remaining))
        return max(0, budget // max(1, left_rounds))

    def _query_transformed(self, epoch: int, transform: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` transformed pool images the surrogate is least sure about, with the API's answers."""
        if n == 0:
            return self.images[:0], self.targets[:0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch)
        picks = torch.randperm(len(self.pool), generator=gen)[: n * self.config.candidates_per_query]
        candidates = _transform_uint8(transform, self.pool.x[picks], self.device)
        probs = torch.softmax(predict_logits(self.surrogate.model, candidates, device=self.device), dim=1)
        top2 = probs.topk(2, dim=1).values
        chosen = candidates[(top2[:, 0] - top2[:, 1]).argsort(stable=True)[:n]]
        answers = torch.cat([self.api.predict(chunk.float().div(255)) for chunk in chosen.split(256)])
        targets, _ = api_targets(self.api, answers, self.config.soft_labels)
        if targets.dim() != self.targets.dim():
            raise ValueError("the API's output kind changed between distillation and refits")
        return chosen, targets.to(self.targets.dtype)

    def _fine_tune(self, epoch: int) -> None:
        original = self.pool.x[self.surrogate.train_indices]
        x = torch.cat([original, self.images])
        targets = torch.cat([self.surrogate.train_targets, self.targets])
        model = self.surrogate.model
        for p in model.parameters():
            p.requires_grad_(True)
        train_classifier(model, x, targets, TrainConfig(epochs=self.config.epochs, lr=self.config.lr, bf16=self.config.bf16),
                         device=self.device, seed=self.seed + epoch, should_cancel=self.should_cancel,
                         stage="surrogate_refit")

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": self.surrogate.model.state_dict(), "images": self.images, "targets": self.targets,
                   "done": self.done, "rounds": self.rounds, "schedule": self.schedule}
        save_atomically(payload, self.state_path)

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        payload = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if payload["schedule"] != self.schedule or payload["targets"].dim() != self.targets.dim():
            return  # another run's refits: start afresh
        self.surrogate.model.load_state_dict(payload["model"])
        self.images, self.targets = payload["images"], payload["targets"]
        self.done, self.rounds = list(payload["done"]), list(payload["rounds"])


@torch.no_grad()
def _transform_uint8(transform: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """T(x) quantised to uint8: what the API is sent, and exactly what the surrogate then trains on."""
    transform = inference_transform(transform)
    out = [to_uint8(transform_images(transform, xb.float().div(255), device)) for xb in x.split(batch_size)]
    return torch.cat(out) if out else x[:0]


def _agreement(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, device: torch.device) -> float:
    if len(images) == 0:
        return float("nan")
    hard = targets if targets.dim() == 1 else targets.argmax(1)
    return float((predict_logits(model, images, device=device).argmax(1) == hard).float().mean())
