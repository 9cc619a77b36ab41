"""Batched, seeded image transformations on [0, 1] tensors (N, C, H, W).

Attacks (warps, rotations, physical distortions) and REFINE's augmentation all
need per-sample random geometry; doing it with one ``affine_grid`` per batch is
an order of magnitude faster on a CPU than per-image torchvision calls.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def affine(
    x: torch.Tensor,
    angle_deg: torch.Tensor,
    translate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate/scale/translate/flip each image about its centre; empty areas become black."""
    n = x.shape[0]
    theta = torch.deg2rad(angle_deg.float())
    s = torch.ones(n) if scale is None else scale.float()
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    mat = torch.zeros(n, 2, 3)
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, -sin, sin, cos
    if flip is not None:
        mat[:, 0, 0] = torch.where(flip, -mat[:, 0, 0], mat[:, 0, 0])
        mat[:, 1, 0] = torch.where(flip, -mat[:, 1, 0], mat[:, 1, 0])
    if translate is not None:
        mat[:, :, 2] = -translate.float() * 2  # fractions of the image size, in grid units
    grid = F.affine_grid(mat.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    return affine(x, torch.full((x.shape[0],), float(degrees)))


def random_affine(
    x: torch.Tensor,
    gen: torch.Generator | None,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    flip_p: float = 0.0,
) -> torch.Tensor:
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, gen)
    shift = torch.stack([_uniform(n, -translate, translate, gen), _uniform(n, -translate, translate, gen)], 1)
    factor = _uniform(n, scale[0], scale[1], gen)
    flip = torch.rand(n, generator=gen) < flip_p
    return affine(x, angle, shift, factor, flip)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator | None, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` (aspect kept) and resize back, batched."""
    n = x.shape[0]
    side = torch.sqrt(_uniform(n, scale[0], scale[1], gen))
    max_shift = 1 - side
    shift = torch.stack([_uniform(n, -1, 1, gen), _uniform(n, -1, 1, gen)], 1) * max_shift[:, None]
    mat = torch.zeros(n, 2, 3)
    mat[:, 0, 0] = side
    mat[:, 1, 1] = side
    mat[:, :, 2] = shift
    grid = F.affine_grid(mat.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: torch.Tensor, gen: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator | None, p: float = 0.2) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * weights).sum(1, keepdim=True).expand_as(x)
    pick = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)
    return torch.where(pick[:, None, None, None], gray, x)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Displace pixels by ``flow`` (1, H, W, 2) in grid units, as WaNet does."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack([xs, ys], -1).unsqueeze(0).to(x.device, x.dtype)
    grid = (identity + flow.to(x.device, x.dtype)).clamp(-1, 1).expand(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

