"""ABD, Anti-Backdoor Data-free KD: the Shuffling Vaccine and Self-Retrospection together (Hong et al.,
"Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023; ALGORITHMS.md section 4).

SV shapes what the student is taught during the whole run; SR unlearns the student's own candidate trigger in
a short second stage at the end. Their hyperparameter names do not overlap, so ``defense.<key>`` goes to whichever
component owns the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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
    """Both plug-ins: every key of :class:`ShufflingVaccine` and of :class:`SelfRetrospection` is accepted."""

    wants_teacher_features = ShufflingVaccine.wants_teacher_features
    defaults: dict[str, Any] = {**ShufflingVaccine.defaults, **SelfRetrospection.defaults}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.sv = ShufflingVaccine(**{k: v for k, v in params.items() if k in ShufflingVaccine.defaults})
        self.sr = SelfRetrospection(**{k: v for k, v in params.items() if k in SelfRetrospection.defaults})
        self.params = {**self.sv.params, **self.sr.params}

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

    def observe(self, batch: Batch, step: int) -> None:
        self.sv.observe(batch, step)

    def generator_term(self, batch: Batch) -> torch.Tensor | None:
        return self.sv.generator_term(batch)

    def student_loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.sv.student_loss(per_sample, batch)

    def stage2_start(self, total_steps: int) -> int | None:
        return self.sr.stage2_start(total_steps)

    def stage2_lr(self) -> float | None:
        return self.sr.stage2_lr()

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        self.sr.add_student_grads(student, teacher, x, step)

    def metrics(self) -> dict[str, float]:
        return {**self.sv.metrics(), **self.sr.metrics()}

    def probe(self, evaluation: Evaluation, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        sv, sr = self.sv.probe(evaluation, student, teacher, step), self.sr.probe(evaluation, student, teacher, step)
        return {**sv, **sr}

    def state_dict(self) -> dict[str, Any]:
        return {"sv": self.sv.state_dict(), "sr": self.sr.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sv.load_state_dict(state["sv"])
        self.sr.load_state_dict(state["sr"])
