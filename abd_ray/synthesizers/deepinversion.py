"""DeepInversion with Adaptive DeepInversion (ADI) (Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha, Kautz;
"Dreaming to Distill", CVPR 2020).

Inputs are optimised directly: the statistics of every BatchNorm layer's input must match the layer's running
mean / variance, the teacher must classify them as sampled labels (cross-entropy), with total-variation and L2
image priors, and (ADI) a competition term ``1 - JS(teacher, student)`` that seeks inputs on which the student
disagrees with the teacher. Each synthesis round's images go into a memory bank; the student distils on batches
drawn from the bank (ALGORITHMS.md section 3).

One loop step is one student step on a bank batch; a synthesis round runs every ``round_every`` steps (the first
at step 0), so 80,000 steps with ``round_every`` 400 give 200 rounds, as CMI's schedule does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from abd_ray.data.augment import kd_augment, shift_flip, unchanged_by
from abd_ray.losses import js_divergence, total_variation
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer
from abd_ray.synthesizers.parts import BNStats, MemoryBank, balanced_labels, frozen


class BankSynthesizer(Synthesizer):
    """Shared machinery of synthesizers that fill a memory bank in rounds and distil from it."""

    fixed_data = True

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        self.bank = MemoryBank(self.params["bank_size"])
        self.aug = kd_augment(ctx.data)

    def synthesize_round(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, step: int) -> Iterator[Batch]:
        if step % self.params["round_every"] == 0 or len(self.bank) == 0:
            student = self.ctx.student
            was = student.training
            student.eval()  # ADI / CMI query the student in eval mode while synthesizing
            try:
                with frozen(student):  # its weight gradients would be thrown away
                    x_new = self.synthesize_round(step)
            finally:
                student.train(was)
            self.bank.add(x_new)
        x, keys = self.bank.sample_keyed(self.ctx.batch_size, self.ctx.gen_cpu)
        x = shift_flip(x, self.ctx.gen, **self.aug)
        yield self.fixed_batch(x, keys=keys if unchanged_by(self.aug) else None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"], self.ctx.device)


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(BankSynthesizer):
    """Input optimisation with BN-statistics, CE, TV, L2 and the ADI competition term; a memory bank."""

    paper = "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020"
    defaults = {
        "iters": 2000,  # DeepInversion: 2k optimisation iterations per batch on CIFAR-10
        "lr_g": 0.05,  # DeepInversion CIFAR-10: Adam on the inputs, lr 0.05
        "bn": 10.0,  # DeepInversion CIFAR-10: feature-distribution (BN statistics) weight 10
        "tv": 1e-3,  # DeepInversion's TV prior; ours: weight of the MEAN squared neighbour difference (a smoothness
        # nudge that does not dominate the BN term at 32x32), not the paper's per-image norm scaling
        "l2": 1e-5,  # DeepInversion's L2 image prior; ours: weight of the per-image mean of squared pixels
        "adi": 1.0,  # ADI: competition weight (0 turns ADI off: plain DeepInversion)
        "jitter": 2,  # DeepInversion: random shift of up to 2 px at 32x32 during optimisation
        "flip": True,  # DeepInversion: random horizontal flips during optimisation
        "round_every": 400,  # steps between rounds: 200 rounds over 80k steps, as CMI's 200 epochs of 400 steps
        "bank_size": 51200,  # keeps every image of 200 rounds of 256 (CMI's bank holds all)
        "lr_s": 0.1,  # student SGD lr 0.1, momentum 0.9 (DeepInversion / CMI CIFAR KD recipe)
        "opt_s": "sgd",
        "wd_s": 5e-4,
        "clip": None,
        "T": 20.0,  # KD temperature of the CMI benchmark in which DeepInversion is compared (Fang et al. 2021)
    }
    dataset_defaults = {
        # 8x8 digits: short rounds (100 iterations converge at this size), a round every 50 steps, no flips
        # (digits are not mirror-symmetric) and 1 px jitter; Adam at 2e-3 for the tiny student.
        "digits": {
            "iters": 100,
            "round_every": 50,
            "jitter": 1,
            "flip": False,
            "lr_g": 0.1,
            "lr_s": 2e-3,
            "opt_s": "adam",
            "wd_s": 0.0,
            "T": 4.0,
        },
    }
    positive = Synthesizer.positive | {"iters", "lr_g", "round_every", "bank_size"}

    def synthesize_round(self, step: int) -> torch.Tensor:
        ctx, p = self.ctx, self.params
        n = ctx.batch_size
        mean = torch.tensor(ctx.data.mean, device=ctx.device).view(1, -1, 1, 1)
        std = torch.tensor(ctx.data.std, device=ctx.device).view(1, -1, 1, 1)
        # Start from noise with the data's first two moments, in pixel space.
        x = (mean + std * torch.randn(n, *ctx.shape, generator=ctx.gen, device=ctx.device)).clamp_(0, 1)
        x.requires_grad_(True)
        y = balanced_labels(n, ctx.num_classes, ctx.gen_cpu, ctx.device)
        opt = torch.optim.Adam([x], lr=p["lr_g"], betas=(0.5, 0.9))
        bn = BNStats(ctx.teacher)
        first = last = None
        for _ in range(p["iters"]):
            xa = shift_flip(x, ctx.gen, pad=p["jitter"], flip=p["flip"])
            with bn, ctx.autocast():
                t_logits = ctx.teacher(xa).float()
            loss = F.cross_entropy(t_logits, y) + p["bn"] * bn.loss()
            loss = loss + p["tv"] * total_variation(xa, p=2) + p["l2"] * xa.pow(2).mean()
            if p["adi"] > 0:
                with ctx.autocast():
                    s_logits = ctx.student(xa).float()
                loss = loss + p["adi"] * (1.0 - js_divergence(t_logits, s_logits))
            # Outside the BN hooks: the vaccine's suspect re-runs the teacher's trunk.
            loss = self.add_defense_term(loss, Batch(xa, t_logits, term_optional=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)  # keep the images in the valid pixel range
            first = loss.item() if first is None else first
            last = loss.item()
        self.log.add("loss_gen", last)
        self.log.add("loss_gen_first", first)
        return x.detach()
