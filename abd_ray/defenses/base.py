"""The defense interface, and the ``none`` defense.

A defense plugs into every synthesizer because it is called in two places only: the KD loop calls ``bind``, the
second-stage hooks and ``metrics``; the :class:`abd_ray.synthesizers.Synthesizer` base class calls the hooks that
see batches (``observe``, ``generator_term``, ``student_loss``), each with the :class:`~abd_ray.synthesizers.Batch`
(inputs, teacher logits, and the teacher's block outputs and sample keys where there are some). The hooks:

- ``check_teacher``: before any compute, with the teacher's architecture (untrained), to refuse settings that do
  not fit it;
- ``bind``: once, before the first step, with the teacher, the student, the run's shape and whether the student
  trains on fixed or banked inputs (``fixed_data``: ood, clean, the banks of deepinversion and cmi) or on fresh
  generator outputs (zskt, dfad, dafl);
- ``observe``: every new batch, detached (the vaccine check collects here);
- ``generator_term``: a term added to a generator's loss; the batch keeps its graph;
- ``student_loss``: turns per-sample KD losses into the batch loss (fixed or banked data may reweight);
- ``stage2_start`` / ``stage2_lr`` / ``stage2_clip`` / ``stage2_fresh_optimizer``: where a second stage starts,
  its fresh learning rate, its gradient clip and whether it starts with a fresh student optimiser (SR);
- ``add_student_grads``: called after ``zero_grad`` and before the KD backward of a student step; may write
  gradients into the student's ``.grad`` (SR's hypergradient), which the KD gradient then adds to;
- ``metrics``: extra metrics reported with every evaluation;
- ``probe``: at every evaluation, diagnostics measured against the run's real test sets where the attack is known
  (did SR find the trigger, does the suspect detect triggered inputs); they never feed back into training;
- ``state_dict`` / ``load_state_dict``: what must survive a checkpoint (loaded after ``bind``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from abd_ray.registry import DEFENSES

if TYPE_CHECKING:
    from abd_ray.engine.build import Evaluation
    from abd_ray.synthesizers.batch import Batch


def child_seed(generator: torch.Generator) -> int:
    """A seed for a defense's own generator, drawn from the run's defense stream."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


class Defense:
    """Base class: the undefended run. Subclasses override the hooks they need.

    Args:
        **params: hyperparameters; an unknown key raises a ValueError listing the allowed ones.
    """

    name = "none"  # set by the registry to each registered class's name
    defaults: dict[str, Any] = {}
    # Whether a fixed-data batch should carry the teacher's block outputs to student_loss (computed only if asked).
    wants_teacher_features: ClassVar[bool] = False

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
        generator: torch.Generator,
        *,
        fixed_data: bool,
    ) -> None:
        """Attach to a run.

        Args:
            teacher: the (frozen, eval-mode) teacher.
            student: the student being distilled.
            shape: (C, H, W) of one input.
            num_classes: class count.
            total_steps: the run's step budget (the unit of ``step`` in the other hooks).
            generator: seeds any randomness the defense draws.
            fixed_data: True when the student trains on fixed or banked inputs, False on fresh generator outputs.
        """

    def observe(self, batch: Batch, step: int) -> None:
        """See a new batch of the synthesizer (detached)."""

    def generator_term(self, batch: Batch) -> torch.Tensor | None:
        """A term to add to a generator's loss on ``batch`` (whose ``x`` keeps its graph), or None."""
        return None

    def student_loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Batch loss from the per-sample KD losses on ``batch``; the undefended mean by default."""
        return per_sample.mean()

    def stage2_start(self, total_steps: int) -> int | None:
        """The step at which a second stage begins (fresh student LR), or None."""
        return None

    def stage2_lr(self) -> float | None:
        return None

    def stage2_clip(self, clip: float | None) -> float | None:
        """The student's gradient-norm clip in the second stage, given the synthesizer's ``clip`` (None: none)."""
        return clip

    def stage2_fresh_optimizer(self) -> bool:
        """Whether the second stage starts with a fresh student optimiser of the same kind (new moments)."""
        return False

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        """Write extra gradients into ``student``'s ``.grad`` before the KD backward of a student step."""

    def metrics(self) -> dict[str, float]:
        return {}

    def probe(self, evaluation: Evaluation, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        """Diagnostics against the run's test sets, reported with the evaluation at ``step``.

        Args:
            evaluation: the clean test set and, where the attack is known, its triggered part and their clean
                originals.
            student: the student, in train mode; a probe that runs it restores its mode and moves no statistics.
            teacher: the frozen teacher.
            step: the steps done.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


DEFENSES.register("none")(Defense)


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """Build a registered defense; unknown names and hyperparameters raise a ValueError with the allowed ones."""
    return DEFENSES.build(name, **(params or {}))
