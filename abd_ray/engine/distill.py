"""The KD loop shared by every synthesizer (ALGORITHMS.md section 3), with the defense hooks of
:mod:`abd_ray.defenses.base`, evaluation through an injected callback, and a whole-loop state that resumes
exactly.

One step of the loop is one step of the synthesizer (a pseudo batch for ``zskt`` / ``dfad`` / ``dafl``, one
student batch for the others); the synthesizer yields the batches of its student steps. The student's learning
rate follows a cosine over the run (restarted at the defense's second stage, if it has one); the loop owns the
student's optimiser, the defense calls and the evaluation, so every synthesizer gets every defense.

Determinism: every random draw after model initialisation comes from three ``torch.Generator`` objects seeded
from the run seed (device draws, CPU draws, the defense's draws), whose states are part of the loop state. A run
stopped at an evaluation and resumed from :func:`load_state` therefore ends where the uninterrupted run ends (on
the CPU, to float tolerance). The float order itself (thread count, deterministic kernels) is fixed by
:func:`abd_ray.engine.repro.fixed_float_order` from the spec, so the same config gives the same metrics from every
entry point.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import abd_ray.defenses  # noqa: F401  (registers every defense that has landed)
from abd_ray.attacks import make_trigger, poisoned_test_set
from abd_ray.config import RunConfig
from abd_ray.data import blank_model, load_dataset, load_shape
from abd_ray.defenses import build_defense
from abd_ray.engine.repro import fixed_float_order
from abd_ray.engine.teacher import (
    Teacher,
    get_teacher,
    load_external,
    load_weights_into,
    read_weights,
    resolve_device,
)
from abd_ray.metrics import evaluate
from abd_ray.models import build_model, classifier_names
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers import SynthContext, Synthesizer
from abd_ray.synthesizers.base import cosine_lr, set_lr

STATE_FORMAT = "abd-ray-distill/1"
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


# --- validation -----------------------------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> tuple[RunConfig, type[Synthesizer], dict[str, Any]]:
    """Validate a run config before any compute; fill in the dataset defaults.

    Returns:
        The resolved config, the synthesizer class and its resolved hyperparameters.

    Raises:
        ValueError: with the bad key and a fix hint (unknown synthesizer / key, steps <= 0, missing files, ...).
    """
    import abd_ray.synthesizers  # noqa: F401  (registration)

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


def load_student(student: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load saved weights into a freshly built student (weights only; no pickled code is run).

    Raises:
        TeacherFileError: the file is unreadable, holds code, NaN/inf, or does not fit the student's architecture.
    """
    p = Path(path)
    return load_weights_into(student, read_weights(p, "student"), p, "student", "the student architecture")


# --- state files ----------------------------------------------------------------------------------------------------


def save_state(state: dict, path: str | os.PathLike) -> None:
    """Write a loop state atomically (a temporary file renamed into place); tensors and plain Python only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike) -> dict:
    """Read a loop state written by :func:`save_state`, weights-only (no pickled code is ever run)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an abd-ray distillation state (format {STATE_FORMAT!r})")
    return state


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor detached and on the CPU (so a held state does not change as training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


# --- the loop --------------------------------------------------------------------------------------------------------


def _teacher_model(teacher: Teacher | nn.Module) -> nn.Module:
    return teacher.model if isinstance(teacher, Teacher) else teacher


def _attack_of(teacher: Teacher | nn.Module, cfg: RunConfig):
    """The attack the teacher carries (its own record wins over the config, which may be a default)."""
    if isinstance(teacher, Teacher):
        try:
            return teacher.spec.attack
        except (KeyError, TypeError):
            pass
    return cfg.attack


def _bind(
    defense, teacher: nn.Module, student: nn.Module, ctx: SynthContext, fixed_data: bool, gen: torch.Generator
) -> None:
    kw: dict[str, Any] = {}
    if "fixed_data" in inspect.signature(defense.bind).parameters:
        kw["fixed_data"] = fixed_data  # the vaccine reweights the student's loss on fixed or banked data
    defense.bind(teacher, student, ctx.shape, ctx.num_classes, ctx.total_steps, generator=gen, **kw)


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
    cfg, _, _ = check_config(cfg)
    # The float order (threads, deterministic kernels) follows the spec, so a trial gives the same result from the
    # CLI, in a study's Ray worker and in a benchmark, whatever the machine or OMP_NUM_THREADS.
    with fixed_float_order(resolve_device(cfg.device), load_shape(cfg.dataset)):
        return _distill(cfg, teacher=teacher, report=report, resume_state=resume_state, progress=progress)


def _distill(
    cfg: RunConfig,
    *,
    teacher: Teacher | None,
    report: ReportFn | None,
    resume_state: dict | None,
    progress: bool,
) -> DistillResult:
    t0 = time.perf_counter()
    cfg, synth_cls, synth_params = check_config(cfg)
    defense = build_defense(cfg.defense, cfg.defense_params)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root)
    if teacher is None:
        if cfg.teacher_file:
            teacher = load_external(cfg.teacher_file, cfg.teacher_spec())
        else:
            teacher = get_teacher(cfg.teacher_spec(), cfg.cache_dir, cfg.data_root, cfg.device, progress=progress)
    t_model = _teacher_model(teacher).to(device).eval()
    for p in t_model.parameters():
        p.requires_grad_(False)  # input gradients still flow through the teacher into a generator
    amp = device.type == "cuda"
    # channels_last pays for convolutions on 32x32 inputs on the CPU too (one ZSKT pseudo batch at the paper's
    # config: 11.6 s -> 10.3 s); on 8x8 digits it only adds layout conversions.
    channels_last = amp or min(data.shape[1:]) >= 16
    if channels_last:
        t_model = t_model.to(memory_format=torch.channels_last)

    # Evaluation sets, once.
    attack = _attack_of(teacher, cfg)
    if attack.active:
        x_poison, y_poison = poisoned_test_set(
            data.x_test, data.y_test, make_trigger(attack, data.shape), attack.target
        )
        target = attack.target
    else:
        x_poison, y_poison, target = data.x_test[:0], data.y_test[:0], None
    x_test, y_test = data.x_test.to(device), data.y_test
    x_poison = x_poison.to(device)

    def measure(model: nn.Module) -> dict[str, float]:
        return evaluate(model, x_test, y_test, x_poison, y_poison, target)

    teacher_metrics = {f"teacher_{k}": v for k, v in measure(t_model).items()}

    # Models and random streams: the same seed builds the same student, generator and draws on every resume.
    steps, eval_every = int(cfg.steps), int(cfg.eval_every)
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
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 3 + 1)
    gen_cpu = torch.Generator().manual_seed(cfg.seed * 3 + 2)
    gen_def = torch.Generator().manual_seed(cfg.seed * 3 + 3)
    ctx = SynthContext(
        t_model, student, data, device, steps, int(cfg.batch_size), defense, gen, gen_cpu, amp, channels_last
    )
    synth = synth_cls(ctx, synth_params)
    opt = synth.student_optimizer(student.parameters())
    base_lr, clip = float(synth.params["lr_s"]), synth.params["clip"]
    _bind(defense, t_model, student, ctx, synth_cls.fixed_data, gen_def)
    s2 = defense.stage2_start(steps)
    s2 = None if s2 is None else max(0, min(int(s2), steps))
    s2_lr = defense.stage2_lr()

    def lr_at(step: int) -> float:
        if s2 is not None and step >= s2:
            return cosine_lr(float(s2_lr) if s2_lr is not None else base_lr, step - s2, steps - s2)
        return cosine_lr(base_lr, step, steps)

    start, history, wall_before = 0, [], 0.0
    kd_sum, kd_n = torch.zeros((), device=device), 0
    step_time = 0.0
    if resume_state is not None:
        st = resume_state
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"resume_state is not an abd-ray distillation state (format {STATE_FORMAT!r})")
        if st.get("synthesizer") != cfg.synthesizer or st.get("student_arch") != cfg.student_arch:
            raise ValueError(
                f"resume_state is of synthesizer {st.get('synthesizer')!r} / student {st.get('student_arch')!r}, "
                f"not {cfg.synthesizer!r} / {cfg.student_arch!r}; resume with the config that wrote it"
            )
        student.load_state_dict(st["student"])
        opt.load_state_dict(_to_device(st["opt_s"], device))
        synth.load_state_dict(_to_device(st["synth"], device))
        defense.load_state_dict(st["defense"])
        start, history, wall_before = int(st["step"]), list(st["history"]), float(st["wall_s"])
        kd_sum = torch.tensor(float(st["kd"][0]), device=device)
        kd_n, step_time = int(st["kd"][1]), float(st["step_time"])
        rng = st["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        gen.set_state(rng["gen"])
        gen_cpu.set_state(rng["gen_cpu"])
        gen_def.set_state(rng["gen_def"])
    cpu_before = float(resume_state.get("cpu_s", 0.0)) if resume_state is not None else 0.0
    t_loop, cpu_loop = time.perf_counter(), time.process_time()

    done = start
    timed_steps = 0
    time_sum = 0.0
    last_x: torch.Tensor | None = None

    def get_state() -> dict:
        return _cpu_copy(
            {
                "format": STATE_FORMAT,
                "synthesizer": cfg.synthesizer,
                "student_arch": cfg.student_arch,
                "config": cfg.to_flat(),
                "step": done,
                "student": student.state_dict(),
                "opt_s": opt.state_dict(),
                "synth": synth.state_dict(),
                "defense": defense.state_dict(),
                "history": history,
                "wall_s": wall_before + (time.perf_counter() - t_loop),
                "cpu_s": cpu_before + (time.process_time() - cpu_loop),
                "kd": [float(kd_sum), kd_n],
                "step_time": step_time,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "gen": gen.get_state(),
                    "gen_cpu": gen_cpu.get_state(),
                    "gen_def": gen_def.get_state(),
                },
            }
        )

    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"distill {cfg.synthesizer}/{cfg.defense}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    try:
        for step in range(start, steps):
            ts = time.perf_counter()
            set_lr(opt, lr_at(step))
            stage2 = s2 is not None and step >= s2
            prev = None
            for batch in synth.batches(step):
                if batch is not prev:
                    defense.observe(batch.x, batch.t_logits, step)
                    prev = batch
                opt.zero_grad(set_to_none=True)
                if stage2:
                    defense.add_student_grads(student, t_model, batch.x, step)
                with ctx.autocast():
                    out = student(batch.x, return_features=synth.needs_features)
                s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
                per_sample = synth.student_loss(s_logits.float(), s_feats, batch)
                loss = ctx.defense_loss(per_sample, batch)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(student.parameters(), clip)
                opt.step()
                kd_sum += per_sample.detach().mean()
                kd_n += 1
            last_x = prev.x if prev is not None else last_x
            done = step + 1
            time_sum += time.perf_counter() - ts
            timed_steps += 1
            bar.update(1)
            if done % eval_every == 0 or done == steps:
                step_time = time_sum / max(timed_steps, 1)
                time_sum, timed_steps = 0.0, 0
                metrics = {k: v for k, v in measure(student).items()}
                metrics.update(teacher_metrics)
                if kd_n:
                    metrics["loss_kd"] = float(kd_sum) / kd_n
                kd_sum, kd_n = torch.zeros((), device=device), 0
                for k, v in synth.losses().items():
                    metrics[k] = v
                metrics["step_time_s"] = step_time
                metrics["lr_s"] = opt.param_groups[0]["lr"]
                metrics.update({k: float(v) for k, v in defense.metrics().items()})
                metrics = {k: float(v) for k, v in metrics.items()}
                history.append({"step": done, **metrics})
                bar.set_postfix(clean_acc=f"{metrics['clean_acc']:.1f}", asr=f"{metrics['asr']:.1f}")
                if report is not None:
                    report(dict(metrics), done, get_state)
    finally:
        bar.close()

    if not metrics:  # a resumed state that was already complete: evaluate once more
        metrics = {**measure(student), **teacher_metrics, **{k: float(v) for k, v in defense.metrics().items()}}
    wall = wall_before + (time.perf_counter() - t_loop)
    # cpu_s: the loop's process CPU time; single-threaded on small inputs, it is what wall_s would be on an idle
    # core, a fairer figure than wall_s on a machine shared with other jobs.
    cpu = cpu_before + (time.process_time() - cpu_loop)
    final = {**metrics, "wall_s": wall, "cpu_s": cpu, "total_wall_s": time.perf_counter() - t0}
    final = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    samples = last_x[:SAMPLES_KEPT].detach().float().cpu() if last_x is not None else torch.empty(0, *data.shape)
    student.eval()
    return DistillResult(final, history, student, samples)


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
