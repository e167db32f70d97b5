"""CMI: Contrastive Model Inversion for Data-Free Knowledge Distillation (Fang, Song, Wang, Shen, Wang, Song;
IJCAI 2021).

Each synthesis round optimises a generator and a fresh batch of latents for DeepInversion's losses (BatchNorm
statistics ``bn``, one-hot cross-entropy to sampled labels ``oh``, an adversarial term ``adv`` that seeks
student-teacher disagreement on samples they still agree on) plus a contrastive loss ``cr``: through a projection
head on the teacher's pooled features, each new sample must be told apart from the other new samples and from
the samples already in the bank, with a local crop of itself as its positive (InfoNCE, temperature ``cr_T``).
The round's images accumulate in a memory bank (with their teacher features, the negatives of later rounds), and
the student distils on batches drawn from the bank (ALGORITHMS.md section 3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.data.augment import random_resized_crop
from abd_ray.losses import info_nce, masked_adversarial
from abd_ray.models import build_model
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer
from abd_ray.synthesizers.deepinversion import BankSynthesizer
from abd_ray.synthesizers.parts import BNStats, MemoryBank, balanced_labels


class ProjectionHead(nn.Module):
    """Two-layer MLP from the teacher's pooled features to the contrastive space (SimCLR-style, as in CMI)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@SYNTHESIZERS.register("cmi")
class CMI(BankSynthesizer):
    """Contrastive model inversion: a generator per round, BN / one-hot / adversarial / contrastive losses."""

    paper = "Fang et al., Contrastive Model Inversion for Data-Free Knowledge Distillation, IJCAI 2021"
    defaults = {
        "z_dim": 256,  # CMI: latent size 256
        "ngf": 64,  # CMI: generator base width 64
        "g_steps": 200,  # CMI: 200 generator steps per synthesis round
        "lr_g": 1e-3,  # CMI: Adam (betas 0.5, 0.999) on generator, latents and head, lr 1e-3
        "bn": 1.0,  # CMI: BN-statistics weight
        "oh": 1.0,  # CMI: one-hot (cross-entropy to sampled labels) weight
        "adv": 0.5,  # CMI: adversarial weight
        "cr": 0.8,  # CMI: contrastive weight
        "cr_T": 0.1,  # CMI: contrastive temperature
        "head_dim": 256,  # CMI: projection head output size
        "n_neg": 4096,  # CMI: bank features drawn as negatives per round
        "local_scale": 0.25,  # CMI: local views are crops of 25% to 100% of the image's area
        "round_every": 400,  # CMI: 400 KD steps per epoch, one synthesis round per epoch (200 epochs = 80k steps)
        "bank_size": 51200,  # CMI keeps every synthesized image (200 rounds of 256)
        "lr_s": 0.1,  # CMI: student SGD lr 0.1, momentum 0.9, cosine
        "opt_s": "sgd",  # CMI
        "wd_s": 1e-4,  # CMI: weight decay 1e-4
        "clip": None,  # CMI: no clipping
        "T": 20.0,  # CMI: KD temperature 20
    }
    dataset_defaults = {
        # 8x8 digits (ours): 50 generator steps per round and a round every 50 steps keep a 3000-step run within
        # minutes on two cores; Adam at 2e-3 for the tiny student; T 4 because the digits teacher's logits are
        # far less spread than a CIFAR WRN's.
        "digits": {
            "ngf": 32,
            "g_steps": 50,
            "round_every": 50,
            "n_neg": 1024,
            "lr_s": 2e-3,
            "opt_s": "adam",
            "wd_s": 0.0,
            "T": 4.0,
        },
    }
    positive = Synthesizer.positive | {
        "z_dim",
        "ngf",
        "g_steps",
        "lr_g",
        "cr_T",
        "head_dim",
        "round_every",
        "bank_size",
        "local_scale",
    }

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        d = ctx.data
        p = self.params
        self.generator = ctx.to_model_format(
            build_model("generator", shape=d.shape, z_dim=p["z_dim"], ngf=p["ngf"], mean=d.mean, std=d.std)
        ).train()
        with torch.no_grad():
            emb_dim = ctx.teacher(torch.zeros(2, *d.shape, device=ctx.device), return_features=True)[1][-1].shape[1]
        self.head = ProjectionHead(emb_dim, p["head_dim"]).to(ctx.device)
        # Teacher features (global view, local view) of every banked sample: the contrastive negatives.
        self.feat_bank = MemoryBank(p["bank_size"])

    @classmethod
    def check_params(cls, p: dict[str, Any]) -> None:
        if not p["local_scale"] <= 1:
            raise ValueError(f"synthesizer 'cmi': synth.local_scale={p['local_scale']!r} must be in (0, 1]")

    def synthesize_round(self, step: int) -> torch.Tensor:
        ctx, p = self.ctx, self.params
        n = ctx.batch_size
        h, w = ctx.shape[1:]
        z = torch.randn(n, p["z_dim"], generator=ctx.gen, device=ctx.device).requires_grad_(True)
        y = balanced_labels(n, ctx.num_classes, ctx.gen_cpu, ctx.device)
        # A fresh optimiser per round over the (persistent) generator and head and the round's latents.
        opt = torch.optim.Adam(
            [{"params": self.generator.parameters()}, {"params": self.head.parameters()}, {"params": [z]}],
            lr=p["lr_g"],
            betas=(0.5, 0.999),
        )
        neg = None
        if len(self.feat_bank) and p["cr"] > 0:
            neg = self.feat_bank.sample(min(p["n_neg"], len(self.feat_bank)), ctx.gen_cpu)  # (M, 2, D)
            neg = neg.flatten(0, 1)
        bn = BNStats(ctx.teacher)
        first = last = None
        x = emb_g = emb_l = None
        for _ in range(p["g_steps"]):
            with ctx.autocast():
                x = self.generator(z)
                with bn:
                    t_logits, t_feats = ctx.teacher(x, return_features=True)
                loss_bn = bn.loss()
                s_logits = ctx.student(x)
            t_logits, s_logits = t_logits.float(), s_logits.float()
            emb_g = t_feats[-1].float()
            loss = p["bn"] * loss_bn + p["oh"] * F.cross_entropy(t_logits, y)
            if p["adv"] > 0:
                loss = loss + p["adv"] * masked_adversarial(s_logits, t_logits)
            if p["cr"] > 0:
                x_local = random_resized_crop(x.float(), n, (h, w), ctx.gen, scale=(p["local_scale"], 1.0))
                with ctx.autocast():
                    emb_l = ctx.teacher(x_local, return_features=True)[1][-1].float()
                neg_proj = self.head(neg) if neg is not None else None
                loss = loss + p["cr"] * info_nce(self.head(emb_g), self.head(emb_l), neg_proj, p["cr_T"])
            loss = self.add_defense_term(loss, Batch(x, t_logits, t_feats))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            last = loss.item()
        self.log.add("loss_gen", last)
        self.log.add("loss_gen_first", first)
        assert x is not None and emb_g is not None
        feats = torch.stack([emb_g.detach(), (emb_l if emb_l is not None else emb_g).detach()], dim=1)
        self.feat_bank.add(feats)
        return x.detach().float()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "generator": self.generator.state_dict(),
            "head": self.head.state_dict(),
            "feat_bank": self.feat_bank.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.head.load_state_dict(state["head"])
        self.feat_bank.load_state_dict(state["feat_bank"], self.ctx.device)
