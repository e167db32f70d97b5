"""The one interface every synthesizer implements, and the pieces several of them share.

A synthesizer turns the teacher (and, for adversarial methods, the student) into batches of inputs for the KD
loop of :mod:`abd_ray.engine.distill`. One loop step asks :meth:`Synthesizer.batches` for the batches of that
step; the synthesizer does its own synthesis work (a generator update, an inversion round, a data draw) before
yielding, and yields one :class:`Batch` per student step. The loop owns the student's optimiser, schedule,
defense hooks and evaluation, so a defense plugs into every synthesizer in the same way.

Everything a synthesizer draws at random comes from the context's ``torch.Generator`` objects, whose states the
loop saves, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from abd_ray.data import DataBundle
from abd_ray.losses import batch_channel_stats, bn_statistics_loss, kd_divergence
from abd_ray.memo import RowMemo


@functools.cache
def _takes(defense_cls: type, hook: str, arg: str) -> bool:
    """Whether a defense class's ``hook`` declares the keyword ``arg`` (asked every step: cached per class)."""
    return arg in inspect.signature(getattr(defense_cls, hook)).parameters


@dataclass
class SynthContext:
    """What a synthesizer may use.

    Attributes:
        teacher: the (eval-mode, frozen) teacher.
        student: the student being trained (synthesizers only read it, or use it in a generator's loss).
        data: the dataset (shape, normalisation; ``clean`` also reads its training set).
        device: where models and data live.
        total_steps: the run's step count.
        batch_size: the run's batch size.
        defense: the run's defense (its ``generator_term`` is added to generator losses).
        gen: random generator on ``device`` (noise, latents, augmentation).
        gen_cpu: random generator on the CPU (indices, permutations).
        amp: use bfloat16 autocast (CUDA only).
        channels_last: keep new models (generators) in channels_last, as the teacher and student are.
        teacher_memo: the teacher's logits on stored samples fed unchanged (see :meth:`fixed_batch`).
    """

    teacher: nn.Module
    student: nn.Module
    data: DataBundle
    device: torch.device
    total_steps: int
    batch_size: int
    defense: Any
    gen: torch.Generator
    gen_cpu: torch.Generator
    amp: bool = False
    channels_last: bool = False
    teacher_memo: RowMemo = field(default_factory=RowMemo, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA when ``amp`` is on; a no-op elsewhere (CPU results stay exact)."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def teacher_out(self, x: torch.Tensor, features: bool = False):
        """Teacher logits (float32) on ``x``, and its block outputs when ``features``; no gradient."""
        with self.autocast():
            if features:
                logits, feats = self.teacher(x, return_features=True)
                return logits.float(), [f.float() for f in feats]
            return self.teacher(x).float()

    def defense_term(
        self, x: torch.Tensor, t_logits: torch.Tensor, t_feats: list[torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """The defense's term for a generator loss on ``x``, or None. The teacher's features go to a defense whose
        ``generator_term`` takes ``t_feats`` (the vaccine reuses them); a plug-in with the two-argument form
        still works."""
        if t_feats is not None and self._defense_takes_feats("generator_term"):
            return self.defense.generator_term(x, t_logits, t_feats=t_feats)
        return self.defense.generator_term(x, t_logits)

    def _defense_takes_feats(self, hook: str) -> bool:
        return _takes(type(self.defense), hook, "t_feats")

    def fixed_batch(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> Batch:
        """A fixed-data synthesizer's batch on ``x``: teacher logits, and the teacher's block outputs when the
        defense's ``student_loss`` takes them (the vaccine then skips the shared trunk's forward).

        ``keys``, given only where ``x`` holds stored samples exactly as stored (no augmentation), names each row's
        sample (:class:`abd_ray.memo.RowMemo`): the teacher's logits are then computed once per sample, and the
        keys go to a defense whose ``student_loss`` takes them, so it can keep its own per-sample outputs.
        """
        if keys is not None:
            return Batch(x, self.teacher_memo.rows(keys, x, self.teacher_out), keys=keys)
        if self._defense_takes_feats("student_loss"):
            logits, feats = self.teacher_out(x, features=True)
            return Batch(x, logits, feats)
        return Batch(x, self.teacher_out(x))

    def defense_loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The defense's batch loss from per-sample KD losses, with the batch's teacher features and sample keys
        for a defense whose ``student_loss`` takes ``t_feats`` / ``keys``."""
        kw: dict[str, Any] = {}
        if batch.t_feats is not None and self._defense_takes_feats("student_loss"):
            kw["t_feats"] = batch.t_feats
        if batch.keys is not None and _takes(type(self.defense), "student_loss", "keys"):
            kw["keys"] = batch.keys
        return self.defense.student_loss(per_sample, batch.x, batch.t_logits, **kw)

    def to_model_format(self, m: nn.Module) -> nn.Module:
        """Move a new model to the device, in the run's memory format."""
        m = m.to(self.device)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m


@dataclass
class Batch:
    """Inputs for one student step, all detached.

    Attributes:
        x: inputs in pixel space (N, C, H, W).
        t_logits: teacher logits on ``x`` (float32).
        t_feats: the teacher's block outputs, when the synthesizer's student loss needs them.
        keys: each row's sample key, where the rows are stored samples fed unchanged (see ``fixed_batch``).
    """

    x: torch.Tensor
    t_logits: torch.Tensor
    t_feats: list[torch.Tensor] | None = None
    keys: torch.Tensor | None = None


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
class _LossLog:
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


class Synthesizer:
    """Base class. Subclasses set ``name``, ``paper``, ``defaults`` and implement :meth:`batches`.

    Hyperparameters every synthesizer has (the student's side of the KD loop):
        opt_s: ``adam`` or ``sgd`` (momentum 0.9).
        lr_s: the student's initial learning rate (cosine-decayed over the run).
        wd_s: the student's weight decay.
        clip: gradient-norm clip of the student's step, or null for none.
        T: KD temperature.

    Args:
        ctx: the run context.
        params: hyperparameter overrides (``synth.<key>``); unknown keys raise a ValueError.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Per-dataset overrides of ``defaults`` (e.g. budgets sized for the 8x8 digits).
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Keys whose value must be > 0 (every other number must be >= 0).
    positive: ClassVar[frozenset[str]] = frozenset({"lr_s", "T"})
    # Keys restricted to a set of strings.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"opt_s": ("adam", "sgd")}
    # Keys that accept null besides their default's type.
    nullable: ClassVar[frozenset[str]] = frozenset({"clip"})
    # True where the student trains on fixed or banked data rather than on a generator's fresh output; the
    # Shuffling Vaccine then reweights the student's loss instead of steering a generator.
    fixed_data: ClassVar[bool] = False
    # Whether the student's loss needs its block outputs (attention transfer).
    needs_features: bool = False

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.params = self.resolve_params(params or {}, ctx.data.name)
        self.log = _LossLog()

    # --- hyperparameters ------------------------------------------------------------------------------------------

    @classmethod
    def resolve_params(cls, params: dict[str, Any], dataset: str | None = None) -> dict[str, Any]:
        """Defaults, then the dataset's overrides, then ``params``; validated.

        Raises:
            ValueError: an unknown key (the allowed ones are listed) or a value of the wrong type or range.
        """
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            raise ValueError(
                f"synthesizer {cls.name!r}: unknown key(s) {', '.join('synth.' + k for k in unknown)}; "
                f"allowed: {', '.join(sorted(cls.defaults))}"
            )
        p = {**cls.defaults, **cls.dataset_defaults.get(dataset or "", {}), **params}
        for k, v in p.items():
            p[k] = cls._check_value(k, v)
        cls.check_params(p)
        return p

    @classmethod
    def _check_value(cls, key: str, v: Any) -> Any:
        d = cls.defaults[key]
        where = f"synthesizer {cls.name!r}: synth.{key}={v!r}"
        if v is None:
            if d is None or key in cls.nullable:
                return None
            raise ValueError(f"{where} may not be null; default {d!r}")
        if key in cls.choices:
            if v not in cls.choices[key]:
                raise ValueError(f"{where} is not allowed; allowed: {', '.join(cls.choices[key])}")
            return v
        ref = d if d is not None else v
        if isinstance(ref, bool):
            if isinstance(v, bool):
                return v
            raise ValueError(f"{where} must be true or false")
        if isinstance(ref, numbers.Number):
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or v != v or math.isinf(v):
                raise ValueError(f"{where} must be a finite number")
            if isinstance(ref, int) and not isinstance(ref, bool) and key not in cls.nullable:
                if float(v) != int(v):
                    raise ValueError(f"{where} must be an integer")
                v = int(v)
            if key in cls.positive and not v > 0:
                raise ValueError(f"{where} must be > 0")
            if v < 0:
                raise ValueError(f"{where} must be >= 0")
            return v
        if isinstance(ref, str) and not isinstance(v, str):
            raise ValueError(f"{where} must be a string")
        return v

    @classmethod
    def check_params(cls, p: dict[str, Any]) -> None:
        """Cross-key or filesystem checks of a subclass (raise ValueError)."""

    # --- the student's side ---------------------------------------------------------------------------------------

    def student_optimizer(self, params) -> torch.optim.Optimizer:
        """The student's optimiser, as the synthesizer's paper used it."""
        p = self.params
        if p["opt_s"] == "adam":
            return torch.optim.Adam(params, lr=p["lr_s"], weight_decay=p["wd_s"])
        return torch.optim.SGD(params, lr=p["lr_s"], momentum=0.9, weight_decay=p["wd_s"])

    def student_loss(self, s_logits: torch.Tensor, s_feats: list[torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        """Per-sample KD loss (N,) of the student on ``batch``; the defense turns it into the batch loss."""
        return kd_divergence(s_logits, batch.t_logits, self.params["T"], reduction="none")

    # --- synthesis ------------------------------------------------------------------------------------------------

    def batches(self, step: int) -> Iterator[Batch]:
        """Do the synthesis work of loop step ``step`` (0-based) and yield one batch per student step."""
        raise NotImplementedError

    def losses(self) -> dict[str, float]:
        """Mean synthesis losses since the last call (e.g. ``loss_gen``)."""
        return self.log.pop()

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values only (loadable with ``weights_only=True``)."""
        return {"log": self.log.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load(state.get("log", {}))


# --- shared pieces ----------------------------------------------------------------------------------------------------


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
        self.dropped = int(state.get("dropped", 0))  # states written before serial numbers: none dropped


def balanced_labels(n: int, num_classes: int, gen_cpu: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` labels with every class as equally often as ``n`` allows, in random order."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=gen_cpu)].to(device)
