"""Classifier architectures and the normalising wrapper every model is used through.

All models in refine-audit take images in [0, 1]; normalisation lives inside
``Classifier`` so the REFINE transformation T produces [0, 1] images that the
frozen model can consume directly (the reference code mixes the two spaces).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torchvision
from torch import nn


@dataclass(frozen=True)
class ArchConfig:
    """What is needed to rebuild a classifier from bare weights."""

    name: str  # key in ARCHITECTURES
    in_channels: int = 1  # 1 for gray (Fashion-MNIST), 3 for RGB
    num_classes: int = 10
    image_size: int = 28  # square side; the small-input variants expect 28 or 32
    mean: tuple[float, ...] = (0.2860,)  # per-channel normalisation inside the model
    std: tuple[float, ...] = (0.3530,)
    width: int = 32  # first-stage channels of the small CNN; ignored by ResNet

    def __post_init__(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.name!r}; known: {sorted(ARCHITECTURES)}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        if self.num_classes < 2:
            raise ValueError("a classifier needs at least two classes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ArchConfig":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


class Classifier(nn.Module):
    """Normalises [0, 1] images, then runs the backbone; returns logits."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: about 0.1 M parameters, fast on a CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stem and no max-pool, the usual adaptation to 28-32 px inputs."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


ARCHITECTURES: dict[str, Callable[["ArchConfig"], nn.Module]] = {
    "small_cnn": lambda c: SmallCNN(c.in_channels, c.num_classes, c.width),
    "resnet18": lambda c: small_resnet18(c.in_channels, c.num_classes),
}


def build_classifier(config: ArchConfig) -> Classifier:
    return Classifier(ARCHITECTURES[config.name](config), config.mean, config.std)


@dataclass(frozen=True)
class UNetConfig:
    """The REFINE input transformation; the paper's F=64/depth 4 is sized for CIFAR on a GPU."""

    in_channels: int = 1
    width: int = 16  # channels of the first stage (the paper's F); doubles per level
    depth: int = 3  # down-sampling stages; 28 px images afford 3 (28 -> 14 -> 7 -> 3)

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 5:
            raise ValueError("UNet depth must be between 1 and 5")
        if self.width < 2:
            raise ValueError("UNet width must be at least 2")

    def to_dict(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "width": self.width, "depth": self.depth}


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = _DoubleConv(cin + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Upsample to the skip's exact size so odd sizes (7 -> 3 -> 7) line up.
        x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net with max-pool downs, bilinear ups and skips; output clamped to [0, 1]."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth + 1)]
        self.inc = _DoubleConv(config.in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[i], widths[i + 1])) for i in range(config.depth)
        )
        self.ups = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(config.depth))
        )
        self.out = nn.Conv2d(widths[0], config.in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.out(y).clamp(0.0, 1.0)
