"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Shen, Wang, Chen, Song, 2019; arXiv:1912.11006).

The same adversarial game as ZSKT, with the mean absolute difference of the logits (L1) as the discrepancy the
generator maximises and the student minimises, and no attention transfer (ALGORITHMS.md section 3).
"""

from __future__ import annotations

import torch

from abd_ray.losses import l1_logits
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.zskt import ZSKT


@SYNTHESIZERS.register("dfad")
class DFAD(ZSKT):
    """ZSKT's game with an L1 logit discrepancy."""

    paper = "Fang et al., Data-Free Adversarial Distillation, arXiv:1912.11006, 2019"
    defaults = {
        "z_dim": 256,  # DFAD: latent size 256
        "ngf": 64,  # DFAD: DCGAN-style generator, base width 64
        "n_g": 1,  # DFAD: 1 generator step per iteration
        "n_s": 5,  # DFAD: 5 student steps per generator step
        "lr_g": 1e-3,  # DFAD: Adam, generator lr 1e-3
        "lr_s": 0.1,  # DFAD: SGD, student lr 0.1 (momentum 0.9); we decay it by cosine, as every method here
        "opt_s": "sgd",  # DFAD
        "wd_s": 5e-4,  # DFAD: weight decay 5e-4
        "clip": None,  # DFAD: no gradient clipping
        "clip_g": None,  # DFAD: no gradient clipping
        "beta": 0.0,  # DFAD has no attention transfer
        "T": 1.0,  # unused by the L1 discrepancy; kept so that every synthesizer has a temperature
    }
    dataset_defaults = {
        # 8x8 digits: the paper's SGD student kept (it learnt far more than ZSKT's Adam recipe, docs/defaults.md);
        # ngf 32 as in zskt's digits defaults.
        "digits": {"ngf": 32},
    }

    def disagreement(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        return l1_logits(s_logits, t_logits, reduction="none")
