"""Batch augmentations on pixel-space images, each one tensor op with no per-sample loop: the dataset's standard
shift-and-flip (teacher training and KD on real images) and random resized crops (patches of a source image)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from abd_ray.data.datasets import DataBundle


def shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool, rows_first: bool = False) -> torch.Tensor:
    """Random integer translation by up to ``pad`` pixels (zero fill) and horizontal flip, per sample, in one op.

    Equivalent to the usual pad-and-crop augmentation; done with one ``grid_sample`` (nearest, exact pixel
    centres) so there is no per-sample loop and gradients flow to ``x``. The shifts and flips are drawn on
    ``gen``'s device and moved to ``x``'s.

    Args:
        rows_first: draw the row shift before the column shift (the teacher's recipe draws in that order).
    """
    n, _, h, w = x.shape
    if not pad and not flip:
        return x
    dev = x.device

    def shift() -> torch.Tensor:
        return torch.randint(-pad, pad + 1, (n,), generator=gen, device=gen.device).to(dev).float()

    if not pad:
        dx = dy = torch.zeros(n, device=dev)
    elif rows_first:
        dy = shift()
        dx = shift()
    else:
        dx = shift()
        dy = shift()
    sx = torch.ones(n, device=dev)
    if flip:
        sx = torch.where(torch.rand(n, generator=gen, device=gen.device).to(dev) < 0.5, -sx, sx)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * dx / w
    theta[:, 1, 2] = 2.0 * dy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="nearest", padding_mode="zeros", align_corners=False)


def unchanged_by(aug: dict[str, Any]) -> bool:
    """Whether ``shift_flip(x, gen, **aug)`` returns ``x`` as it is (no shift, no flip)."""
    return not aug["pad"] and not aug["flip"]


def kd_augment(data: DataBundle) -> dict[str, Any]:
    """The dataset's standard augmentation as ``shift_flip`` keywords (pad-4 crop, + flip on CIFAR; none on
    digits)."""
    return asdict(data.info.augment)


def random_resized_crop(
    src: torch.Tensor,
    n: int,
    out_hw: tuple[int, int],
    gen: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    src_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` random crops of ``src`` (B, C, H, W), each of area fraction in ``scale`` (log-uniform), resized to
    ``out_hw`` with bilinear ``roi_align`` in one call (differentiable in ``src``).

    Args:
        src: source images.
        n: crops to cut.
        out_hw: output (H, W).
        gen: random generator on ``src``'s device.
        scale: (min, max) crop area as a fraction of the source image.
        ratio: (min, max) aspect ratio (width / height), log-uniform.
        src_index: which source image each crop comes from (default: crop i from image i mod B).
    """
    from torchvision.ops import roi_align

    b, _, h, w = src.shape
    dev = src.device
    u = torch.rand(n, 3, generator=gen, device=dev)
    log_s = math.log(scale[0]) + u[:, 0] * (math.log(scale[1]) - math.log(scale[0]))
    log_r = math.log(ratio[0]) + u[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    area = log_s.exp() * h * w
    cw = (area * log_r.exp()).sqrt().clamp(1.0, w)
    ch = (area / log_r.exp()).sqrt().clamp(1.0, h)
    u2 = torch.rand(n, 2, generator=gen, device=dev)
    x1 = u2[:, 0] * (w - cw)
    y1 = u2[:, 1] * (h - ch)
    idx = src_index if src_index is not None else torch.arange(n, device=dev) % b
    boxes = torch.stack([idx.to(dev).float(), x1, y1, x1 + cw, y1 + ch], dim=1)
    return roi_align(src, boxes.to(src.dtype), out_hw, spatial_scale=1.0, sampling_ratio=2, aligned=True)
