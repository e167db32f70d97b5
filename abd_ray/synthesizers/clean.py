"""Clean KD: the reference point of the ABD paper (Hong et al., ICML 2023) -- knowledge distillation
(Hinton, Vinyals & Dean 2015) on a fraction (the paper: 20%) of the real, clean training data.

The teacher is poisoned, the data is not: a trigger never appears in the student's inputs, so the backdoor
should not transfer (ALGORITHMS.md section 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from abd_ray.data.augment import kd_augment, shift_flip, unchanged_by
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer


@SYNTHESIZERS.register("clean")
class CleanKD(Synthesizer):
    """KD on a random fraction of the clean training set (drawn once per run seed)."""

    paper = "Hinton et al. 2015, as the clean-data reference of Hong et al., ICML 2023"
    fixed_data = True
    defaults = {
        "fraction": 0.2,  # ABD paper: 20% of the clean training data
        "augment": True,  # the dataset's standard crop/flip (none on 8x8 digits)
        "T": 1.0,  # the ZSKT student recipe (plain KL, Adam 2e-3, clip 5), so clean is comparable with zskt
        "lr_s": 2e-3,
        "opt_s": "adam",
        "wd_s": 0.0,
        "clip": 5.0,
    }
    positive = Synthesizer.positive | {"fraction"}

    @classmethod
    def check_params(cls, p: dict[str, Any]) -> None:
        if not p["fraction"] <= 1:
            raise ValueError(f"synthesizer 'clean': synth.fraction={p['fraction']!r} must be in (0, 1]; e.g. 0.2")

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        n = len(ctx.data.x_train)
        k = max(1, round(self.params["fraction"] * n))
        idx = torch.randperm(n, generator=ctx.gen_cpu)[:k]
        self.x = ctx.data.x_train[idx].to(ctx.device)
        self.aug = kd_augment(ctx.data) if self.params["augment"] else {"pad": 0, "flip": False}

    def batches(self, step: int) -> Iterator[Batch]:
        idx = torch.randint(0, len(self.x), (self.ctx.batch_size,), generator=self.ctx.gen_cpu).to(self.x.device)
        x = shift_flip(self.x[idx], self.ctx.gen, **self.aug)
        yield self.fixed_batch(x, keys=idx if unchanged_by(self.aug) else None)
