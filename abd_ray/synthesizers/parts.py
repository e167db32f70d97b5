"""Pieces several synthesizers share: loss logs, the cosine schedule, freezing a model, the BatchNorm-statistics
collector, the memory bank and balanced labels."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from abd_ray.losses import batch_channel_stats, bn_statistics_loss


@dataclass
class _Mean:
    """A running mean of scalar losses between two evaluations."""

    total: float = 0.0
    count: int = 0

    def add(self, v: float) -> None:
        self.total += float(v)
        self.count += 1

    def pop(self) -> float | None:
        if not self.count:
            return None
        v = self.total / self.count
        self.total, self.count = 0.0, 0
        return v


@dataclass
class LossLog:
    """Running means of a synthesizer's named losses, popped at each evaluation and kept in its state."""

    means: dict[str, _Mean] = field(default_factory=dict)

    def add(self, name: str, v: float) -> None:
        self.means.setdefault(name, _Mean()).add(v)

    def pop(self) -> dict[str, float]:
        out = {k: m.pop() for k, m in self.means.items()}
        return {k: v for k, v in out.items() if v is not None}

    def state(self) -> dict[str, list[float]]:
        return {k: [m.total, float(m.count)] for k, m in self.means.items()}

    def load(self, s: dict[str, list[float]]) -> None:
        self.means = {k: _Mean(float(v[0]), int(v[1])) for k, v in s.items()}


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` at step 0 to 0 at step ``total`` (Loshchilov & Hutter 2017, no restarts)."""
    if total <= 0:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / total))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of a model's parameters for a generator step (input gradients still flow)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


class BNStats:
    """Collect the BatchNorm-statistics loss of a model's forward passes while the context is open.

    Forward hooks are registered on entry and removed on exit, so no hook outlives the synthesis step (a defense
    that copies the teacher does not copy them).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._handles: list = []
        self._stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _hook(self, module: nn.Module, inputs, output) -> None:
        mean, var = batch_channel_stats(inputs[0])
        self._stats.append((mean, var, module.running_mean, module.running_var))

    def __enter__(self) -> BNStats:
        self._stats = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def loss(self) -> torch.Tensor:
        """The BN-statistics loss of the forward passes seen so far (then forgets them)."""
        stats, self._stats = self._stats, []
        if not stats:
            raise ValueError("the teacher has no BatchNorm layer; the BN-statistics loss needs one (set synth.bn=0)")
        m, v, rm, rv = zip(*stats, strict=True)
        return bn_statistics_loss(m, v, rm, rv)


class MemoryBank:
    """A growing store of synthesized inputs (and optional features), capped at ``max_size`` (oldest dropped).

    Every entry has a serial number (how many entries were added before it), which stays its key while it is
    held, whatever is dropped before it.

    Args:
        max_size: most entries kept.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = int(max_size)
        self.x: torch.Tensor | None = None
        self.dropped = 0  # entries dropped from the front: the serial number of ``x[0]``

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.x = x.clone() if self.x is None else torch.cat([self.x, x])
        if len(self.x) > self.max_size:
            self.dropped += len(self.x) - self.max_size
            self.x = self.x[-self.max_size :].clone()

    def sample(self, n: int, gen_cpu: torch.Generator) -> torch.Tensor:
        """``n`` entries drawn uniformly with replacement."""
        return self.sample_keyed(n, gen_cpu)[0]

    def sample_keyed(self, n: int, gen_cpu: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` entries drawn uniformly with replacement, and their serial numbers."""
        assert self.x is not None and len(self.x), "sample from an empty bank"
        idx = torch.randint(0, len(self.x), (n,), generator=gen_cpu).to(self.x.device)
        return self.x[idx], idx + self.dropped

    def state_dict(self) -> dict[str, Any]:
        x = None if self.x is None else self.x.detach().cpu().clone()
        return {"x": x, "max_size": self.max_size, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.x = None if state["x"] is None else state["x"].to(device)
        self.dropped = int(state.get("dropped", 0))  # a state without serial numbers: none dropped


def balanced_labels(n: int, num_classes: int, gen_cpu: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` labels with every class as equally often as ``n`` allows, in random order."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=gen_cpu)].to(device)
