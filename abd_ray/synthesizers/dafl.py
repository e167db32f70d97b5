"""DAFL: Data-Free Learning of Student Networks (Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian; ICCV 2019).

A generator is trained to make the teacher behave as it does on real data: confident outputs (one-hot loss),
high activations of the teacher's pooled features (activation loss) and a balanced class distribution over the
batch (information-entropy loss). The student distils on the generator's samples (ALGORITHMS.md section 3). As
in DAFL, each step updates the generator and then the student on the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from abd_ray.losses import activation_loss, information_entropy_loss, one_hot_loss
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, Synthesizer
from abd_ray.synthesizers.zskt import GenerativeSynthesizer


@SYNTHESIZERS.register("dafl")
class DAFL(GenerativeSynthesizer):
    """Generator trained for one-hot, activation and information-entropy losses on the teacher."""

    paper = "Chen et al., Data-Free Learning of Student Networks, ICCV 2019"
    defaults = {
        "z_dim": 100,  # DAFL: latent size 100 (MNIST); the CIFAR recipe used 1000
        "ngf": 64,  # DAFL: DCGAN-style generator
        "n_s": 1,  # DAFL: one student step per generator step, on the same samples
        "lr_g": 0.02,  # DAFL CIFAR-10 recipe: generator Adam lr 0.02
        "lr_s": 0.1,  # DAFL CIFAR-10 recipe: student SGD lr 0.1
        "opt_s": "sgd",  # DAFL CIFAR-10 recipe
        "wd_s": 5e-4,  # DAFL CIFAR-10 recipe
        "clip": None,  # DAFL: no clipping
        "oh": 0.05,  # DAFL CIFAR-10 recipe: one-hot loss weight
        "a": 0.01,  # DAFL CIFAR-10 recipe: activation loss weight
        "ie": 5.0,  # DAFL: information-entropy loss weight
        "T": 1.0,  # DAFL: plain KL on the teacher's soft outputs
    }
    dataset_defaults = {
        # DAFL's MNIST recipe (the closest to 8x8 digits): Adam for the student at 2e-3, one-hot 1, activation 0.1;
        # ours: generator lr 1e-2 instead of MNIST's 0.2 (a generator a fraction of MNIST's size, Adam at 0.2 is
        # an order of magnitude above every other generator lr here).
        "digits": {"lr_g": 1e-2, "lr_s": 2e-3, "opt_s": "adam", "wd_s": 0.0, "oh": 1.0, "a": 0.1, "ngf": 32},
    }
    positive = Synthesizer.positive | {"z_dim", "ngf", "n_s", "lr_g"}

    def _gen_loss(self, x: torch.Tensor, t_logits: torch.Tensor, t_feats) -> torch.Tensor:
        p = self.params
        oh = one_hot_loss(t_logits)
        act = activation_loss(t_feats[-1])
        ie = information_entropy_loss(t_logits)
        self.log.add("loss_oh", oh.item())
        self.log.add("loss_ie", ie.item())
        return p["oh"] * oh + p["a"] * act + p["ie"] * ie

    def batches(self, step: int) -> Iterator[Batch]:
        self._set_lr(step)
        z = self.sample_z()
        # The student learns from the samples the generator made before its update, as in DAFL's joint step.
        x, t_logits, loss = self.generator_step(z, self._gen_loss)
        self.log.add("loss_gen", loss.item())
        batch = Batch(x.float(), t_logits)
        for _ in range(self.params["n_s"]):
            yield batch
