"""Tiny, seeded, synthetic data so unit tests train real models in seconds."""

from __future__ import annotations

import pytest
import torch

from auditor.data import ImageSet
from auditor.models import ArchConfig, build_classifier
from auditor.training import TrainConfig, train_classifier


def synthetic_images(n: int, num_classes: int = 4, size: int = 16, seed: int = 0) -> ImageSet:
    """Each class is a bright square at its own position on a noisy background."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, size, size, generator=gen) * 0.3
    cell = size // 4
    for k in range(num_classes):
        r, c = divmod(k, 2)
        x[y == k, :, 2 + r * cell * 2 : 2 + r * cell * 2 + cell, 2 + c * cell * 2 : 2 + c * cell * 2 + cell] += 0.6
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="session")
def tiny_data() -> tuple[ImageSet, ImageSet]:
    return synthetic_images(480, seed=0), synthetic_images(160, seed=1)


@pytest.fixture(scope="session")
def tiny_holdout() -> ImageSet:
    """Labelled images outside both tiny_data splits (a control's held-out split)."""
    return synthetic_images(200, seed=2)


@pytest.fixture(scope="session")
def tiny_arch() -> ArchConfig:
    return ArchConfig("small_cnn", in_channels=1, num_classes=4, image_size=16, mean=(0.3,), std=(0.3,), width=8)


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tiny_arch):
    train, _ = tiny_data
    torch.manual_seed(0)
    model = build_classifier(tiny_arch)
    train_classifier(model, train.x, train.y, TrainConfig(epochs=3, batch_size=32, lr=5e-3), device=torch.device("cpu"), seed=0)
    return model
