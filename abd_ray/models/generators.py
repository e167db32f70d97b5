"""Generators for the generative synthesizers.

``generator``: the ZSKT / DFAD / DAFL / CMI generator (Micaelli & Storkey 2019; Chen et al. 2019; Fang et al.
2021): a linear projection of ``z`` to a (128, H/4, W/4) map, two upsample-conv-BN-LeakyReLU stages and a final
conv. Its last BatchNorm (no affine) puts the output in the classifier's normalised space; we map it back to
pixel space with the dataset's mean / std, so a classifier's own normalisation sees exactly the generator's
output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from abd_ray.registry import MODELS


class Generator(nn.Module):
    """DCGAN-style generator ``z -> image``.

    Args:
        shape: (C, H, W) of the images; H and W divisible by 4.
        z_dim: latent size (100 in ZSKT).
        ngf: base width (64 in ZSKT / CMI at 32x32).
        mean: per-channel dataset mean (pixel-space output).
        std: per-channel dataset std.
    """

    def __init__(
        self,
        shape: Sequence[int],
        z_dim: int = 100,
        ngf: int = 64,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        c, h, w = shape
        if h % 4 or w % 4:
            raise ValueError(f"generator needs H and W divisible by 4, got {h}x{w}")
        self.shape = tuple(shape)
        self.z_dim = z_dim
        self.init_hw = (h // 4, w // 4)
        self.fc = nn.Linear(z_dim, 2 * ngf * self.init_hw[0] * self.init_hw[1])
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, c, 3, 1, 1),
            nn.BatchNorm2d(c, affine=False),
        )
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self._ngf = ngf

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], 2 * self._ngf, *self.init_hw)
        return self.net(h) * self.std + self.mean

    def sample_z(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator, device=device)


MODELS.register("generator", kind="generator")(Generator)
