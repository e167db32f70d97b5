"""ZSKT: Zero-Shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey, NeurIPS 2019).

A generator ``G(z)``, ``z ~ N(0, I)``, plays an adversarial game with the student: per pseudo batch, ``n_g``
generator steps maximise the student-teacher divergence, then ``n_s`` student steps minimise the KD divergence
plus ``beta`` times the attention-transfer loss on matching block outputs (ALGORITHMS.md section 3).

Performance: with the generator in train mode and the teacher in eval mode, every student step of a pseudo
batch sees exactly the same inputs and teacher outputs (the generator does not change during them). So the
pseudo batch runs the generator and the teacher ONCE for its ``n_s`` student steps, with the inputs detached;
and the generator step does not compute the student's weight gradients (they are thrown away). Re-running
both at each of the 11 iterations, back-propagating every student step into the generator, gives the same math
slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from abd_ray.losses import KD_FORMS, attention_transfer, features_match, kd_divergence
from abd_ray.models import build_model
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer
from abd_ray.synthesizers.parts import cosine_lr, frozen, set_lr


class GenerativeSynthesizer(Synthesizer):
    """Shared machinery of the synthesizers with a generator ``G(z)`` trained alongside the student."""

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        d = ctx.data
        self.generator = ctx.to_model_format(
            build_model(
                "generator", shape=d.shape, z_dim=self.params["z_dim"], ngf=self.params["ngf"], mean=d.mean, std=d.std
            )
        ).train()  # train mode throughout: its BatchNorms use batch statistics, as in the papers
        self.opt_g = self.make_generator_optimizer()

    def make_generator_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.params["lr_g"])

    def sample_z(self) -> torch.Tensor:
        return torch.randn(self.ctx.batch_size, self.params["z_dim"], generator=self.ctx.gen, device=self.ctx.device)

    def generator_step(self, z: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One generator update with ``loss_fn(x, t_logits, t_feats) -> loss``, plus the defense's term.

        Returns:
            The inputs ``G(z)`` before the update, the teacher's logits on them, and the loss (all detached).
        """
        ctx = self.ctx
        with ctx.autocast():
            x = self.generator(z)
            t_logits, t_feats = ctx.teacher(x, return_features=True)
        t_logits = t_logits.float()
        loss = self.add_defense_term(loss_fn(x, t_logits, t_feats), Batch(x, t_logits, t_feats))
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if self.params.get("clip_g") is not None:
            nn.utils.clip_grad_norm_(self.generator.parameters(), self.params["clip_g"])
        self.opt_g.step()
        return x.detach(), t_logits.detach(), loss.detach()

    def _set_lr(self, step: int) -> None:
        set_lr(self.opt_g, cosine_lr(self.params["lr_g"], step, self.ctx.total_steps))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])


@SYNTHESIZERS.register("zskt")
class ZSKT(GenerativeSynthesizer):
    """Zero-shot KT: adversarial generator, KD + attention transfer for the student."""

    paper = "Micaelli & Storkey, Zero-Shot Knowledge Transfer via Adversarial Belief Matching, NeurIPS 2019"
    defaults = {
        "z_dim": 100,  # ZSKT: latent size 100
        "ngf": 64,  # ZSKT / DCGAN generator base width at 32x32
        "n_g": 1,  # ZSKT: 1 generator step per pseudo batch
        "n_s": 10,  # ZSKT: 10 student steps per pseudo batch
        "lr_g": 1e-3,  # ZSKT: Adam, generator lr 1e-3
        "lr_s": 2e-3,  # ZSKT: Adam, student lr 2e-3
        "opt_s": "adam",  # ZSKT
        "wd_s": 0.0,  # ZSKT: no weight decay
        "clip": 5.0,  # ZSKT: gradient norm clipped at 5 (student)
        "clip_g": 5.0,  # ZSKT: gradient norm clipped at 5 (generator)
        "beta": 250.0,  # ZSKT: attention-transfer weight; forced to 0 when the block outputs do not pair up
        "T": 1.0,  # ZSKT: plain KL between the softmaxes
        # The KL's scale for the student's KD and the generator's loss: "batchmean" (ours: summed over classes,
        # x T^2, mean over the batch) or "mean" (the original code: mean over batch and classes, no T^2).
        "kd_reduction": "batchmean",
        # The third attention map of a WRN: "post_bn" (ours: after the final BN-ReLU) or "pre_bn" (the original
        # code's, before it); the same map on classifiers without a BN after their last stage.
        "at_layer": "post_bn",
    }
    dataset_defaults = {
        # 8x8 digits (ours, docs/defaults.md): ZSKT's 10 student steps per generator step double the cost for no
        # gain, and an 8x8 grey image needs far less generator than 32x32 RGB.
        "digits": {"n_s": 5, "ngf": 32},
    }
    positive = Synthesizer.positive | {"z_dim", "ngf", "n_g", "n_s", "lr_g"}
    nullable = Synthesizer.nullable | {"clip_g"}
    choices = {**Synthesizer.choices, "kd_reduction": KD_FORMS, "at_layer": ("post_bn", "pre_bn")}

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        if "at_layer" in self.params:
            # Set on every run (not only pre_bn ones), so a model shared with an earlier run keeps no stale choice.
            for model in (ctx.student, ctx.teacher):
                if hasattr(model, "features_pre_bn"):
                    model.features_pre_bn = self.params["at_layer"] == "pre_bn"
        self.beta = float(self.params["beta"])
        if self.beta > 0 and not self._blocks_pair_up():
            self.beta = 0.0  # ZSKT: attention transfer only between architectures whose blocks pair up
        self.needs_features = self.beta > 0

    @torch.no_grad()
    def _blocks_pair_up(self) -> bool:
        x = torch.zeros(2, *self.ctx.shape, device=self.ctx.device)
        was = self.ctx.student.training
        self.ctx.student.eval()
        _, sf = self.ctx.student(x, return_features=True)
        self.ctx.student.train(was)
        _, tf = self.ctx.teacher(x, return_features=True)
        return features_match(sf[:-1], tf[:-1])

    def disagreement(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """Per-sample divergence the generator maximises."""
        return kd_divergence(s_logits, t_logits, self.params["T"], reduction="none", form=self.params["kd_reduction"])

    def _gen_loss(self, x: torch.Tensor, t_logits: torch.Tensor, t_feats) -> torch.Tensor:
        student = self.ctx.student
        with frozen(student), self.ctx.autocast():
            s_logits = student(x)
        return -self.disagreement(s_logits.float(), t_logits).mean()

    def batches(self, step: int) -> Iterator[Batch]:
        self._set_lr(step)
        z = self.sample_z()
        for _ in range(self.params["n_g"]):
            _, _, loss = self.generator_step(z, self._gen_loss)
            self.log.add("loss_gen", loss.item())
        # Once per pseudo batch: the generator is fixed during the student steps and stays in train mode (batch
        # statistics), the teacher is in eval mode, so these are the inputs every student step would see.
        with torch.no_grad(), self.ctx.autocast():
            x = self.generator(z).float()
        t_logits, t_feats = self.ctx.teacher_out(x, features=True)
        batch = Batch(x, t_logits, t_feats if self.needs_features else None)
        for _ in range(self.params["n_s"]):
            yield batch

    def student_loss(self, s_logits: torch.Tensor, s_feats, batch: Batch) -> torch.Tensor:
        loss = self.disagreement(s_logits.float(), batch.t_logits)
        if self.beta > 0:
            assert s_feats is not None and batch.t_feats is not None, "attention transfer needs block outputs"
            loss = loss + self.beta * attention_transfer(s_feats[:-1], batch.t_feats[:-1], reduction="none")
        return loss
