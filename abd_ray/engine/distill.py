"""The KD loop shared by every synthesizer and every defense (ALGORITHMS.md section 3).

:func:`distill` checks the config once, builds the run (:func:`abd_ray.engine.build.build_run`) and trains: one
step of the loop is one step of the synthesizer (a pseudo batch for ``zskt`` / ``dfad`` / ``dafl``, one student
batch for the others), whose batches each get one student step. The loop owns the student's optimiser, its
learning-rate schedule, the defense's second stage and the evaluation; the synthesizer owns the calls that show
batches to the defense. A run stopped at an evaluation and resumed from its state
(:class:`abd_ray.engine.state.LoopState`) ends where the uninterrupted run ends. The float order (thread count,
deterministic kernels) is fixed by :func:`abd_ray.engine.repro.fixed_float_order` from the spec, so the same
config gives the same metrics from every entry point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from abd_ray.config import RunConfig
from abd_ray.data import blank_model, load_shape
from abd_ray.defenses import build_defense
from abd_ray.engine.build import Run, build_run, load_student
from abd_ray.engine.repro import fixed_float_order
from abd_ray.engine.state import STATE_FORMAT, LoopState, load_state, save_state
from abd_ray.engine.teacher import Teacher, resolve_device
from abd_ray.models import classifier_names
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers import Synthesizer
from abd_ray.synthesizers.parts import set_lr

__all__ = [
    "STATE_FORMAT",
    "DistillResult",
    "check_config",
    "describe",
    "distill",
    "load_state",
    "load_student",
    "save_state",
]

SAMPLES_KEPT = 64

ReportFn = Callable[[dict[str, float], int, Callable[[], dict]], None]


@dataclass
class DistillResult:
    """What a distillation returns.

    Attributes:
        metrics: final clean_acc, asr, robust_acc, teacher_clean_acc, teacher_asr, teacher_robust_acc, wall_s,
            plus the defense's metrics.
        history: every evaluation's metrics, each with ``step``.
        student: the trained student.
        samples: up to 64 synthesized inputs (pixel space) of the last batch, for a picture grid.
    """

    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    student: nn.Module | None = None
    samples: torch.Tensor | None = None


def check_config(cfg: RunConfig) -> tuple[RunConfig, type[Synthesizer], dict[str, Any]]:
    """Validate a run config before any compute; fill in the dataset defaults.

    Returns:
        The resolved config, the synthesizer class and its resolved hyperparameters.

    Raises:
        ValueError: with the bad key and a fix hint (unknown synthesizer / key, steps <= 0, missing files, ...).
    """
    cfg = cfg.resolved()
    cls = SYNTHESIZERS.get(cfg.synthesizer)
    for key in ("steps", "batch_size", "eval_every"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{key}={v!r} must be a positive integer; e.g. --set {key}=100")
    for key in ("teacher_arch", "student_arch"):
        if getattr(cfg, key) not in classifier_names():
            raise ValueError(f"unknown model {getattr(cfg, key)!r} for {key}; known: {', '.join(classifier_names())}")
    if not isinstance(cfg.synth, dict) or not isinstance(cfg.defense_params, dict):
        raise ValueError("synth and defense_params must be dicts of hyperparameters")
    params = cls.resolve_params(dict(cfg.synth), cfg.dataset)
    # Unknown names / keys / ranges raise here; so do settings the teacher's architecture cannot take.
    build_defense(cfg.defense, cfg.defense_params).check_teacher(blank_model(cfg.teacher_arch, cfg.dataset))
    if cfg.teacher_file is not None:
        if not Path(cfg.teacher_file).exists():
            raise ValueError(
                f"teacher_file={cfg.teacher_file!r} does not exist; give an artifact folder or weights file"
            )
    else:
        cfg.teacher_spec().validate()
    if cfg.student_file is not None and not Path(cfg.student_file).is_file():
        raise ValueError(
            f"student_file={cfg.student_file!r} does not exist; give a student weights file (.safetensors or .pt)"
        )
    resolve_device(cfg.device)
    return cfg, cls, params


def distill(
    cfg: RunConfig,
    *,
    teacher: Teacher | None = None,
    report: ReportFn | None = None,
    resume_state: dict | None = None,
    progress: bool = True,
) -> DistillResult:
    """Distil a student from a (poisoned) teacher with the configured synthesizer and defense.

    Args:
        cfg: the run config (dataset defaults are filled in by :meth:`RunConfig.resolved`).
        teacher: a loaded teacher; default: ``cfg.teacher_file`` or the cache (trained if missing).
        report: called at every evaluation (every ``eval_every`` steps and at the end) with the metrics, the
            number of steps done, and a function returning the loop's whole state.
        resume_state: a state from ``get_state()`` / :func:`load_state`; the run continues from it.
        progress: show a progress bar with live clean_acc / asr.

    Returns:
        The final metrics, the evaluation history, the student and the last synthesized samples.
    """
    cfg, synth_cls, synth_params = check_config(cfg)
    # The float order (threads, deterministic kernels) follows the spec, so a trial gives the same result from the
    # CLI, in a study's Ray worker and in a benchmark, whatever the machine or OMP_NUM_THREADS.
    with fixed_float_order(resolve_device(cfg.device), load_shape(cfg.dataset)):
        t0 = time.perf_counter()
        run = build_run(cfg, synth_cls, synth_params, teacher, progress)
        state = LoopState(run)
        if resume_state is not None:
            state.restore(resume_state)
        metrics, last_x = _loop(run, state, report, progress)
        if not metrics:  # a resumed state that was already complete: evaluate once more
            metrics = {**run.evaluation.measure(run.student), **run.teacher_metrics, **_defense_metrics(run)}
        final = {**metrics, "wall_s": state.wall_s(), "cpu_s": state.cpu_s(), "total_wall_s": time.perf_counter() - t0}
    final = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shape = run.data.shape
    samples = last_x[:SAMPLES_KEPT].detach().float().cpu() if last_x is not None else torch.empty(0, *shape)
    run.student.eval()
    return DistillResult(final, state.history, run.student, samples)


def _loop(
    run: Run, state: LoopState, report: ReportFn | None, progress: bool
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Train from ``state.step`` to the end; returns the last evaluation's metrics and the last batch's inputs."""
    student, synth = run.student, run.synth
    steps, eval_every = int(run.cfg.steps), int(run.cfg.eval_every)
    desc = f"distill {run.cfg.synthesizer}/{run.cfg.defense}"
    bar = tqdm(total=steps, initial=state.step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    last_x, time_sum, timed_steps = None, 0.0, 0
    try:
        for step in range(state.step, steps):
            ts = time.perf_counter()
            opt = run.optimizer_at(step)
            set_lr(opt, run.lr_at(step))
            stage2, clip = run.in_stage2(step), run.clip_at(step)
            for batch in synth.student_batches(step):
                opt.zero_grad(set_to_none=True)
                if stage2:
                    run.defense.add_student_grads(student, run.teacher, batch.x, step)
                with synth.ctx.autocast():
                    out = student(batch.x, return_features=synth.needs_features)
                s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
                loss, per_sample = synth.batch_loss(s_logits, s_feats, batch)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(student.parameters(), clip)
                opt.step()
                state.kd_sum += per_sample.detach().mean()
                state.kd_n += 1
                last_x = batch.x
            state.step = step + 1
            time_sum += time.perf_counter() - ts
            timed_steps += 1
            bar.update(1)
            if state.step % eval_every == 0 or state.step == steps:
                state.step_time = time_sum / max(timed_steps, 1)
                time_sum, timed_steps = 0.0, 0
                metrics = _evaluate(run, state)
                state.history.append({"step": state.step, **metrics})
                bar.set_postfix(clean_acc=f"{metrics['clean_acc']:.1f}", asr=f"{metrics['asr']:.1f}")
                if report is not None:
                    report(dict(metrics), state.step, state.capture)
    finally:
        bar.close()
    return metrics, last_x


def _defense_metrics(run: Run) -> dict[str, float]:
    return {k: float(v) for k, v in run.defense.metrics().items()}


def _evaluate(run: Run, state: LoopState) -> dict[str, float]:
    """The metrics of one evaluation: the student's, the teacher's, the window's losses, the timing,
    the learning rate and the defense's."""
    metrics = dict(run.evaluation.measure(run.student))
    metrics.update(run.teacher_metrics)
    kd = state.pop_kd()
    if kd is not None:
        metrics["loss_kd"] = kd
    metrics.update(run.synth.losses())
    metrics["step_time_s"] = state.step_time
    metrics["lr_s"] = run.opt.param_groups[0]["lr"]
    metrics.update(_defense_metrics(run))
    metrics.update(run.defense.probe(run.evaluation, run.student, run.teacher, state.step))
    return {k: float(v) for k, v in metrics.items()}


def describe(metrics: dict[str, float]) -> str:
    """A short human summary of final metrics."""

    def f(k: str) -> str:
        v = metrics.get(k, float("nan"))
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    return (
        f"student clean_acc {f('clean_acc')}  asr {f('asr')}  robust_acc {f('robust_acc')} | "
        f"teacher clean_acc {f('teacher_clean_acc')}  asr {f('teacher_asr')} | wall {f('wall_s')} s "
        f"(CPU {f('cpu_s')} s)"
    )
