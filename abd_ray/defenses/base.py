"""The defense interface the distillation loop calls, and the ``none`` defense.

The KD loop (``abd_ray.engine.distill``) calls these hooks and nothing else, so a defense plugs into every
synthesizer:

- ``check_teacher``: before any compute, with the teacher's architecture (untrained), to refuse settings that do
  not fit it;
- ``bind``: once, with the teacher, the student and the run's shape, before the first step; the keyword
  ``fixed_data`` says whether the student's inputs are fixed or banked (ood, clean, deepinversion's and cmi's
  banks: True) or fresh generator outputs (zskt, dfad, dafl: False, the default), which selects how the Shuffling
  Vaccine acts (it reweights ``student_loss`` only on fixed or banked data; ``generator_term`` whenever called);
- ``observe``: every synthesized batch with its teacher logits (the vaccine check collects here);
- ``generator_term``: a term added to a generator's loss (generative synthesizers);
- ``student_loss``: turns per-sample KD losses into the batch loss (fixed or banked data may reweight);
- ``stage2_start`` / ``stage2_lr``: where a second stage starts, and its fresh learning rate (SR);
- ``add_student_grads``: called after ``zero_grad`` and before the KD backward of a student step; may write
  gradients into the student's ``.grad`` (SR's hypergradient), which the KD gradient then adds to;
- ``metrics``: extra metrics reported with every evaluation;
- ``state_dict`` / ``load_state_dict``: what must survive a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from abd_ray.registry import DEFENSES


class Defense:
    """Base class: the undefended run. Subclasses override the hooks they need.

    Args:
        **params: hyperparameters; an unknown key raises a ValueError listing the allowed ones.
    """

    name = "none"
    defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(f"defense {self.name!r}: unknown hyperparameter(s) {unknown}; allowed: {allowed}")
        self.params = {**self.defaults, **params}
        self.validate()

    def validate(self) -> None:
        """Check ``self.params``; raise ValueError naming the key and the allowed range."""

    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise ValueError when the hyperparameters cannot act on this teacher's architecture.

        Called before any compute with an untrained model (on the meta device: only its structure is there).
        """

    def bind(
        self,
        teacher: nn.Module,
        student: nn.Module,
        shape: tuple[int, int, int],
        num_classes: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        *,
        fixed_data: bool = False,
    ) -> None:
        """Attach to a run.

        Args:
            teacher: the (frozen, eval-mode) teacher.
            student: the student being distilled.
            shape: (C, H, W) of one input.
            num_classes: class count.
            total_steps: the run's step budget (the unit of ``step`` in the other hooks).
            generator: seeds any randomness the defense draws.
            fixed_data: True when the student trains on fixed or banked inputs (ood, clean, deepinversion, cmi),
                False when it trains on fresh generator outputs (zskt, dfad, dafl).
        """

    def observe(self, x: torch.Tensor, t_logits: torch.Tensor, step: int) -> None:
        """See a synthesized batch (no gradient needed)."""

    def generator_term(
        self, x: torch.Tensor, t_logits: torch.Tensor, t_feats: list[torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """A term to add to a generator's loss, or None (``t_feats``: the teacher's features on ``x``; a plug-in may
        leave the argument out)."""
        return None

    def student_loss(self, per_sample: torch.Tensor, x: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """Batch loss from per-sample KD losses; the undefended mean by default. A defense that declares a
        ``t_feats`` keyword gets the teacher's block outputs on ``x`` from fixed-data synthesizers (the vaccine
        does); without it, none are kept. One that declares ``keys`` gets, where the rows of ``x`` are stored samples
        fed unchanged (unaugmented ``clean`` and banks), each row's sample key (``abd_ray.memo.RowMemo``) and then
        no ``t_feats``."""
        return per_sample.mean()

    def stage2_start(self, total_steps: int) -> int | None:
        """The step at which a second stage begins (fresh student LR), or None."""
        return None

    def stage2_lr(self) -> float | None:
        return None

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        """Write extra gradients into ``student``'s ``.grad`` before the KD backward of a student step."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


DEFENSES.register("none")(Defense)


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """Build a registered defense; unknown names and hyperparameters raise a ValueError with the allowed ones."""
    return DEFENSES.build(name, **(params or {}))
