"""The one interface every synthesizer implements, and the context it runs in.

A synthesizer turns the teacher (and, for adversarial methods, the student) into batches of inputs for the KD
loop of :mod:`abd_ray.engine.distill`. Each loop step asks :meth:`Synthesizer.student_batches` for the batches of
that step; the subclass does its synthesis work in :meth:`Synthesizer.batches` (a generator update, an inversion
round, a data draw) and yields one :class:`Batch` per student step.

The base class owns every call into the defense, so no synthesizer can leave it out: a generator's loss gets the
defense's term through :meth:`Synthesizer.add_defense_term`, every student loss goes through the defense's
``student_loss`` in :meth:`Synthesizer.batch_loss`, and every new batch is shown to ``observe``. A synthesizer that
trains on generator outputs (``fixed_data`` False) and builds no generator loss through the base fails at once.

Everything a synthesizer draws at random comes from the context's ``torch.Generator`` objects, whose states the
loop saves, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from abd_ray.data import DataBundle
from abd_ray.losses import kd_divergence
from abd_ray.memo import RowMemo
from abd_ray.synthesizers.batch import Batch
from abd_ray.synthesizers.parts import LossLog

__all__ = ["Batch", "SynthContext", "Synthesizer"]


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
        defense: the run's defense; only the :class:`Synthesizer` base class calls it.
        gen: random generator on ``device`` (noise, latents, augmentation).
        gen_cpu: random generator on the CPU (indices, permutations).
        amp: use bfloat16 autocast (CUDA only).
        channels_last: keep new models (generators) in channels_last, as the teacher and student are.
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

    def to_model_format(self, m: nn.Module) -> nn.Module:
        """Move a new model to the device, in the run's memory format."""
        m = m.to(self.device)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m


class Synthesizer:
    """Base class. Subclasses set ``paper`` and ``defaults`` and implement :meth:`batches`; the registry sets ``name``.

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

    name: ClassVar[str] = ""  # set by the registry to the name the class is registered under
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
    # defense is told at bind (the Shuffling Vaccine then reweights the student's loss instead of steering a
    # generator). False obliges the synthesizer to build a generator loss through add_defense_term every step.
    fixed_data: ClassVar[bool] = False
    # Whether the student's loss needs its block outputs (attention transfer).
    needs_features: bool = False

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.params = self.resolve_params(params or {}, ctx.data.name)
        self.log = LossLog()
        self.teacher_memo = RowMemo()  # the teacher's logits on stored samples fed unchanged (fixed_batch)
        self._term_added = False

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
        """Per-sample KD loss (N,) of the student on ``batch``; :meth:`batch_loss` hands it to the defense."""
        return kd_divergence(s_logits, batch.t_logits, self.params["T"], reduction="none")

    def batch_loss(
        self, s_logits: torch.Tensor, s_feats: list[torch.Tensor] | None, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's loss on ``batch`` as the defense makes it from the per-sample KD losses.

        Returns:
            (the batch loss to back-propagate, the per-sample KD losses).
        """
        per_sample = self.student_loss(s_logits.float(), s_feats, batch)
        return self.ctx.defense.student_loss(per_sample, batch), per_sample

    # --- synthesis ------------------------------------------------------------------------------------------------

    def batches(self, step: int) -> Iterator[Batch]:
        """Do the synthesis work of loop step ``step`` (0-based) and yield one batch per student step."""
        raise NotImplementedError

    def student_batches(self, step: int) -> Iterator[Batch]:
        """The batches of loop step ``step``, each new one shown to the defense (what the loop iterates).

        Raises:
            RuntimeError: a synthesizer on generator outputs built no generator loss through
                :meth:`add_defense_term` before its first batch (the vaccine would silently do nothing).
        """
        self._term_added = False
        prev = None
        for batch in self.batches(step):
            if not (self.fixed_data or self._term_added):
                raise RuntimeError(
                    f"synthesizer {self.name!r} trains on generator outputs but built no generator loss through "
                    "add_defense_term(); build it there, or set fixed_data = True"
                )
            if batch is not prev:
                self.ctx.defense.observe(batch, step)
                prev = batch
            yield batch

    def add_defense_term(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        """A generator's loss on ``batch`` (which keeps its graph) plus the defense's generator term."""
        self._term_added = True
        term = self.ctx.defense.generator_term(batch)
        if term is not None:
            loss = loss + term
        return loss

    def fixed_batch(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> Batch:
        """A fixed-data batch on ``x``: teacher logits, and the teacher's block outputs when the defense
        :meth:`~abd_ray.defenses.base.Defense.wants_teacher_features` (the vaccine then skips the shared trunk).

        ``keys``, given only where ``x`` holds stored samples exactly as stored (no augmentation), names each row's
        sample (:class:`abd_ray.memo.RowMemo`): the teacher's logits are then computed once per sample, and the
        defense may keep its own per-sample outputs by the same keys.
        """
        ctx = self.ctx
        if keys is not None:
            return Batch(x, self.teacher_memo.rows(keys, x, ctx.teacher_out), keys=keys)
        if ctx.defense.wants_teacher_features:
            logits, feats = ctx.teacher_out(x, features=True)
            return Batch(x, logits, feats)
        return Batch(x, ctx.teacher_out(x))

    def losses(self) -> dict[str, float]:
        """Mean synthesis losses of the evaluation window, then reset (e.g. ``loss_gen``)."""
        return self.log.pop()

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values only (loadable with ``weights_only=True``)."""
        return {"log": self.log.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load(state.get("log", {}))

