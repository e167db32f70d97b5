"""The classifier base class and the one factory for every model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from abd_ray.registry import MODELS


class Classifier(nn.Module):
    """A classifier that takes pixel-space input in [0, 1] and normalises it itself.

    Subclasses implement :meth:`blocks` (the feature trunk, as a list of stages) and :meth:`head`. The block
    outputs are the features used for attention transfer.

    Args:
        in_channels: input channel count.
        num_classes: number of classes.
        mean: per-channel mean subtracted from the input.
        std: per-channel std the input is divided by.
    """

    def __init__(self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) not in (1, in_channels) or len(std) not in (1, in_channels):
            raise ValueError(f"mean/std need 1 or {in_channels} values, got {len(mean)} and {len(std)}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def stages(self) -> nn.ModuleList:
        raise NotImplementedError

    def pool_head(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (N, D) of the last block output."""
        raise NotImplementedError

    def run_stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` applied to the previous stage's output (or to the normalised input for ``i = 0``)."""
        return self.stages()[i](h)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        h = (x - self.mean) / self.std
        feats = []
        for i in range(len(self.stages())):
            h = self.run_stage(i, h)
            feats.append(h)
        emb = self.pool_head(h)
        logits = self.fc(emb)
        if return_features:
            return logits, feats + [emb]
        return logits

    def forward_from(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """The logits from the output of stage ``start - 1`` (``start = 0``: from the normalised input), so a
        model that shares its first stages with another can reuse that model's features."""
        for i in range(start, len(self.stages())):
            h = self.run_stage(i, h)
        return self.fc(self.pool_head(h))


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    """The model's convolutions from the input side to the output side (registration follows forward order)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def classifier_names() -> list[str]:
    return [n for n in MODELS.names() if MODELS.meta(n).get("kind") == "classifier"]


def generator_names() -> list[str]:
    return [n for n in MODELS.names() if MODELS.meta(n).get("kind") == "generator"]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Classifiers take ``num_classes``, ``shape`` (C, H, W), ``mean`` and ``std``; generators take their own
    keyword arguments (see ``abd_ray.models.generators``).
    """
    return MODELS.build(name, **kwargs)
