"""Build a distillation run from a checked config: the teacher, the evaluation sets, the student, the random
streams, the synthesizer, the defense and the student's schedule (ALGORITHMS.md section 3).

Determinism: every random draw after model initialisation comes from three ``torch.Generator`` objects seeded
from the run seed (device draws, CPU draws, the defense's draws), whose states are part of the loop state, so a
resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from abd_ray.attacks import make_trigger, poisoned_test_set
from abd_ray.config import RunConfig
from abd_ray.data import DataBundle, load_dataset
from abd_ray.defenses import Defense, build_defense
from abd_ray.engine.teacher import Teacher, get_teacher, load_external, load_weights_into, read_weights, resolve_device
from abd_ray.metrics import evaluate
from abd_ray.models import build_model
from abd_ray.synthesizers import SynthContext, Synthesizer
from abd_ray.synthesizers.parts import cosine_lr


def load_student(student: nn.Module, path) -> nn.Module:
    """Load saved weights into a freshly built student (weights only; no pickled code is run).

    Raises:
        TeacherFileError: the file is unreadable, holds code, NaN/inf, or does not fit the student's architecture.
    """
    from pathlib import Path

    p = Path(path)
    return load_weights_into(student, read_weights(p, "student"), p, "student", "the student architecture")


@dataclass
class Evaluation:
    """The test sets of a run, made once: clean test data and its triggered, non-target part.

    Attributes:
        x_test, y_test: the clean test set.
        x_poison, y_poison: every non-target test image with the trigger, with its true label.
        x_poison_clean: the same images without the trigger (``x_poison - x_poison_clean`` is the trigger's change).
        target: the attack's target class, None without an attack.
    """

    x_test: torch.Tensor
    y_test: torch.Tensor
    x_poison: torch.Tensor
    y_poison: torch.Tensor
    target: int | None
    x_poison_clean: torch.Tensor | None = None

    @classmethod
    def of(cls, data: DataBundle, attack, device: torch.device) -> Evaluation:
        if attack.active:
            x_poison, y_poison = poisoned_test_set(
                data.x_test, data.y_test, make_trigger(attack, data.shape), attack.target
            )
            target = attack.target
            x_clean = data.x_test[data.y_test != target]
        else:
            x_poison, y_poison, target = data.x_test[:0], data.y_test[:0], None
            x_clean = x_poison
        return cls(data.x_test.to(device), data.y_test, x_poison.to(device), y_poison, target, x_clean.to(device))

    def measure(self, model: nn.Module) -> dict[str, float]:
        """clean_acc, asr and robust_acc of ``model``."""
        return evaluate(model, self.x_test, self.y_test, self.x_poison, self.y_poison, self.target)


@dataclass
class Run:
    """Everything a distillation loop needs, built once.

    Attributes:
        cfg: the resolved config.
        device: where the models live.
        data: the dataset.
        teacher: the frozen, eval-mode teacher model.
        student: the student, in train mode.
        synth: the synthesizer (it calls the defense's batch hooks).
        defense: the bound defense.
        opt: the student's optimiser.
        streams: the run's random generators by state key (device draws, CPU draws, the defense's draws).
        evaluation: the test sets.
        teacher_metrics: the teacher's clean_acc / asr / robust_acc, prefixed ``teacher_``.
        clip: the student's gradient-norm clip, or None.
        base_lr: the student's initial learning rate.
        stage2_from: the step where the defense's second stage starts, or None.
        stage2_lr: the second stage's fresh learning rate (None: the first stage's).
        stage2_clip: the student's gradient-norm clip in the second stage, or None.
        stage2_fresh_opt: whether the second stage starts with a fresh optimiser of the student's kind.
    """

    cfg: RunConfig
    device: torch.device
    data: DataBundle
    teacher: nn.Module
    student: nn.Module
    synth: Synthesizer
    defense: Defense
    opt: torch.optim.Optimizer
    streams: dict[str, torch.Generator]
    evaluation: Evaluation
    teacher_metrics: dict[str, float]
    clip: float | None
    base_lr: float
    stage2_from: int | None
    stage2_lr: float | None
    stage2_clip: float | None = None
    stage2_fresh_opt: bool = False

    def in_stage2(self, step: int) -> bool:
        """Whether loop step ``step`` is in the defense's second stage."""
        return self.stage2_from is not None and step >= self.stage2_from

    def lr_at(self, step: int) -> float:
        """The student's learning rate: a cosine over the run, restarted at the defense's second stage."""
        s2, steps = self.stage2_from, int(self.cfg.steps)
        if s2 is not None and step >= s2:
            lr = float(self.stage2_lr) if self.stage2_lr is not None else self.base_lr
            return cosine_lr(lr, step - s2, steps - s2)
        return cosine_lr(self.base_lr, step, steps)

    def clip_at(self, step: int) -> float | None:
        """The student's gradient-norm clip at loop step ``step`` (None: no clip)."""
        return self.stage2_clip if self.in_stage2(step) else self.clip

    def optimizer_at(self, step: int) -> torch.optim.Optimizer:
        """The student's optimiser for loop step ``step``: a fresh one of the same kind where the second stage
        starts with one (as a run resumed from a checkpoint with new moments), the current one otherwise. A run
        resumed after that step loads the fresh optimiser's state into the one it built."""
        if self.stage2_fresh_opt and step == self.stage2_from:
            self.opt = self.synth.student_optimizer(self.student.parameters())
        return self.opt


def _attack_of(teacher: Teacher | nn.Module, cfg: RunConfig):
    """The attack the teacher carries (its own record wins over the config, which may be a default)."""
    if isinstance(teacher, Teacher):
        try:
            return teacher.spec.attack
        except (KeyError, TypeError):
            pass
    return cfg.attack


def build_run(
    cfg: RunConfig,
    synth_cls: type[Synthesizer],
    synth_params: dict[str, Any],
    teacher: Teacher | None = None,
    progress: bool = False,
) -> Run:
    """Build the run of a config checked by :func:`abd_ray.engine.distill.check_config`.

    Args:
        cfg: the resolved config.
        synth_cls: its synthesizer class.
        synth_params: its resolved synthesizer hyperparameters.
        teacher: a loaded teacher; default: ``cfg.teacher_file`` or the cache (trained if missing).
        progress: show the teacher's training progress, if it must be trained.
    """
    defense = build_defense(cfg.defense, cfg.defense_params)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root)
    if teacher is None:
        if cfg.teacher_file:
            teacher = load_external(cfg.teacher_file, cfg.teacher_spec())
        else:
            teacher = get_teacher(cfg.teacher_spec(), cfg.cache_dir, cfg.data_root, cfg.device, progress=progress)
    t_model = (teacher.model if isinstance(teacher, Teacher) else teacher).to(device).eval()
    for p in t_model.parameters():
        p.requires_grad_(False)  # input gradients still flow through the teacher into a generator
    amp = device.type == "cuda"
    # channels_last pays for convolutions on 32x32 inputs; on 8x8 digits it only adds layout conversions.
    channels_last = amp or min(data.shape[1:]) >= 16
    if channels_last:
        t_model = t_model.to(memory_format=torch.channels_last)
    evaluation = Evaluation.of(data, _attack_of(teacher, cfg), device)
    teacher_metrics = {f"teacher_{k}": v for k, v in evaluation.measure(t_model).items()}

    # The same seed builds the same student and generators, and draws the same numbers, on every resume.
    torch.manual_seed(cfg.seed)
    student = (
        build_model(cfg.student_arch, num_classes=data.num_classes, shape=data.shape, mean=data.mean, std=data.std)
        .to(device)
        .train()
    )
    if cfg.student_file:
        load_student(student, cfg.student_file)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    streams = {
        "gen": torch.Generator(device=device).manual_seed(cfg.seed * 3 + 1),
        "gen_cpu": torch.Generator().manual_seed(cfg.seed * 3 + 2),
        "gen_def": torch.Generator().manual_seed(cfg.seed * 3 + 3),
    }
    steps = int(cfg.steps)
    ctx = SynthContext(
        t_model, student, data, device, steps, int(cfg.batch_size), defense, streams["gen"], streams["gen_cpu"],
        amp, channels_last,
    )
    synth = synth_cls(ctx, synth_params)
    opt = synth.student_optimizer(student.parameters())
    defense.bind(t_model, student, data.shape, data.num_classes, steps, streams["gen_def"],
                 fixed_data=synth_cls.fixed_data)
    s2 = defense.stage2_start(steps)
    s2 = None if s2 is None else max(0, min(int(s2), steps))
    clip = synth.params["clip"]
    return Run(
        cfg, device, data, t_model, student, synth, defense, opt, streams, evaluation, teacher_metrics,
        clip, float(synth.params["lr_s"]), s2, defense.stage2_lr(), defense.stage2_clip(clip),
        defense.stage2_fresh_optimizer(),
    )
