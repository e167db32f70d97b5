"""The loop state of a distillation: what changes as a run trains, written to and read from one checkpoint
format, so that a run stopped at an evaluation and resumed ends where the uninterrupted run ends."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from abd_ray.engine.build import Run

STATE_FORMAT = "abd-ray-distill/1"


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


@dataclass
class LoopState:
    """The changing part of a run: its models' and optimisers' states (held by ``run``), the step, the history,
    the running KD mean, the clocks and the random streams. :meth:`capture` and :meth:`restore` are the one
    place the checkpoint's keys are written.

    Attributes:
        run: the built run whose objects carry the weights and random streams.
        step: loop steps done.
        history: every evaluation's metrics, each with ``step``.
        kd_sum: the sum of the per-step mean KD losses of the current evaluation window (a device scalar).
        kd_n: how many terms ``kd_sum`` holds.
        step_time: mean seconds per step over the last evaluation window.
        wall_before: wall seconds of the loop before this process (a resumed run's earlier part).
        cpu_before: process CPU seconds of the loop before this process.
    """

    run: Run
    step: int = 0
    history: list[dict] = field(default_factory=list)
    kd_sum: torch.Tensor | None = None
    kd_n: int = 0
    step_time: float = 0.0
    wall_before: float = 0.0
    cpu_before: float = 0.0

    def __post_init__(self) -> None:
        if self.kd_sum is None:
            self.kd_sum = torch.zeros((), device=self.run.device)
        self.start_clocks()

    def start_clocks(self) -> None:
        self._t_loop, self._cpu_loop = time.perf_counter(), time.process_time()

    def wall_s(self) -> float:
        return self.wall_before + (time.perf_counter() - self._t_loop)

    def cpu_s(self) -> float:
        return self.cpu_before + (time.process_time() - self._cpu_loop)

    def pop_kd(self) -> float | None:
        """The mean KD loss of the window (None when no step ran), and start a new window."""
        out = float(self.kd_sum) / self.kd_n if self.kd_n else None
        self.kd_sum, self.kd_n = torch.zeros((), device=self.run.device), 0
        return out

    def capture(self) -> dict:
        """The whole loop state as tensors and plain Python on the CPU (loadable with ``weights_only=True``)."""
        r, device = self.run, self.run.device
        return _cpu_copy(
            {
                "format": STATE_FORMAT,
                "synthesizer": r.cfg.synthesizer,
                "student_arch": r.cfg.student_arch,
                "config": r.cfg.to_flat(),
                "step": self.step,
                "student": r.student.state_dict(),
                "opt_s": r.opt.state_dict(),
                "synth": r.synth.state_dict(),
                "defense": r.defense.state_dict(),
                "history": self.history,
                "wall_s": self.wall_s(),
                "cpu_s": self.cpu_s(),
                "kd": [float(self.kd_sum), self.kd_n],
                "step_time": self.step_time,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    **{k: g.get_state() for k, g in r.streams.items()},
                },
            }
        )

    def restore(self, st: dict) -> None:
        """Continue from a state written by :meth:`capture`.

        Raises:
            ValueError: the state is not a distillation state, or was written by another synthesizer / student.
        """
        r, device = self.run, self.run.device
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"resume_state is not an abd-ray distillation state (format {STATE_FORMAT!r})")
        if st.get("synthesizer") != r.cfg.synthesizer or st.get("student_arch") != r.cfg.student_arch:
            raise ValueError(
                f"resume_state is of synthesizer {st.get('synthesizer')!r} / student {st.get('student_arch')!r}, "
                f"not {r.cfg.synthesizer!r} / {r.cfg.student_arch!r}; resume with the config that wrote it"
            )
        r.student.load_state_dict(st["student"])
        r.opt.load_state_dict(_to_device(st["opt_s"], device))
        r.synth.load_state_dict(_to_device(st["synth"], device))
        r.defense.load_state_dict(st["defense"])
        self.step, self.history, self.wall_before = int(st["step"]), list(st["history"]), float(st["wall_s"])
        self.kd_sum = torch.tensor(float(st["kd"][0]), device=device)
        self.kd_n, self.step_time = int(st["kd"][1]), float(st["step_time"])
        rng = st["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        for k, g in r.streams.items():
            g.set_state(rng[k])
        self.cpu_before = float(st.get("cpu_s", 0.0))
        self.start_clocks()
