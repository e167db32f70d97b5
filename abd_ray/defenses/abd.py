"""ABD, Anti-Backdoor Data-free KD: the Shuffling Vaccine and Self-Retrospection together (Hong et al.,
"Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023; ALGORITHMS.md section 4).

SV shapes what the student is taught during the whole run; SR unlearns the student's own candidate trigger in
a short second stage at the end. Their hyperparameter names do not overlap, so ``defense.<key>`` goes to whichever
component owns the key; ``sv_in_stage2`` is ABD's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from abd_ray.defenses._params import as_bool
from abd_ray.defenses.base import Defense
from abd_ray.defenses.retrospection import SelfRetrospection
from abd_ray.defenses.vaccine import ShufflingVaccine
from abd_ray.registry import DEFENSES

if TYPE_CHECKING:
    from abd_ray.engine.build import Evaluation
    from abd_ray.synthesizers.batch import Batch

assert not set(ShufflingVaccine.defaults) & set(SelfRetrospection.defaults), "SV and SR keys must not overlap"


@DEFENSES.register("abd")
class ABD(Defense):
    """Both plug-ins: every key of :class:`ShufflingVaccine` and of :class:`SelfRetrospection` is accepted.

    Hyperparameters of its own (``defense.<key>``):
        sv_in_stage2: whether SV's generator term and reweighting stay on once SR's second stage runs (default
            true); false turns them off there, as the original's OOD and CMI SR stages run without SV.
    """

    wants_teacher_features = ShufflingVaccine.wants_teacher_features
    own_defaults: dict[str, Any] = {"sv_in_stage2": True}
    defaults: dict[str, Any] = {**ShufflingVaccine.defaults, **SelfRetrospection.defaults, **own_defaults}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        own = {k: self.params[k] for k in self.own_defaults}
        self.sv = ShufflingVaccine(**{k: v for k, v in params.items() if k in ShufflingVaccine.defaults})
        self.sr = SelfRetrospection(**{k: v for k, v in params.items() if k in SelfRetrospection.defaults})
        self.params = {**self.sv.params, **self.sr.params, **own}
        self._stage2_from: int | None = None
        self._step = -1  # the step of the last batch observed

    def validate(self) -> None:
        self.params["sv_in_stage2"] = as_bool("sv_in_stage2", self.params["sv_in_stage2"])

    def _sv_on(self, step: int) -> bool:
        """Whether SV acts at loop step ``step`` (always, unless sv_in_stage2 is false and SR's stage runs)."""
        s2 = self._stage2_from
        return self.params["sv_in_stage2"] or s2 is None or step < s2

    def check_teacher(self, teacher: nn.Module) -> None:
        self.sv.check_teacher(teacher)
        self.sr.check_teacher(teacher)

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
        self.sv.bind(teacher, student, shape, num_classes, total_steps, generator, fixed_data=fixed_data)
        self.sr.bind(teacher, student, shape, num_classes, total_steps, generator, fixed_data=fixed_data)
        s2 = self.sr.stage2_start(total_steps)
        self._stage2_from = None if s2 is None else max(0, min(int(s2), total_steps))  # as the loop clamps it

    def observe(self, batch: Batch, step: int) -> None:
        self._step = step
        self.sv.observe(batch, step)

    def generator_term(self, batch: Batch) -> torch.Tensor | None:
        # A step's synthesis runs before its first batch is observed: it belongs to the step after the last one.
        if not self._sv_on(self._step + 1):
            return None
        return self.sv.generator_term(batch)

    def student_loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self._sv_on(self._step):
            return per_sample.mean()
        return self.sv.student_loss(per_sample, batch)

    def stage2_start(self, total_steps: int) -> int | None:
        return self.sr.stage2_start(total_steps)

    def stage2_lr(self) -> float | None:
        return self.sr.stage2_lr()

    def stage2_clip(self, clip: float | None) -> float | None:
        return self.sr.stage2_clip(clip)

    def stage2_fresh_optimizer(self) -> bool:
        return self.sr.stage2_fresh_optimizer()

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        self.sr.add_student_grads(student, teacher, x, step)

    def metrics(self) -> dict[str, float]:
        return {**self.sv.metrics(), **self.sr.metrics()}

    def probe(self, evaluation: Evaluation, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        sv, sr = self.sv.probe(evaluation, student, teacher, step), self.sr.probe(evaluation, student, teacher, step)
        return {**sv, **sr}

    def state_dict(self) -> dict[str, Any]:
        return {"sv": self.sv.state_dict(), "sr": self.sr.state_dict(), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sv.load_state_dict(state["sv"])
        self.sr.load_state_dict(state["sr"])
        self._step = int(state.get("step", -1))
