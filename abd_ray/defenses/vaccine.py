"""The Shuffling Vaccine (SV) of ABD: Hong et al., "Revisiting Data-Free Knowledge Distillation with Poisoned
Teachers", ICML 2023 (ALGORITHMS.md section 4.1).

A backdoor is a shortcut that survives damage to a network's ordinary features. Permuting the input channels of
the teacher's last few convolutions destroys the ordinary features, yet a trigger-bearing input often keeps its
prediction. So a synthesized input on which a channel-shuffled teacher still agrees with the teacher is suspect,
and SV steers distillation away from such inputs:

- generative synthesizers: a term ``-coef * sum(m * d) / sum(m)`` is added to the generator's loss, so the
  generator is pushed towards inputs on which the shuffled teacher disagrees with the teacher;
- fixed or banked data: the per-sample KD losses of masked samples are reweighted (``fixed_mode``): the paper's
  ``mean(l[~m]) - coef * mean(l[m])`` (``ascent``), the same with each masked loss capped so the ascent stops
  (``capped``), or masked samples left out (``drop``).

An optional vaccine check first tests whether the shuffled ensemble separates anything at all on the run's own
synthesized data (a low tail of the log-divergence), re-drawing the permutations when it does not.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.defenses._params import as_bool, as_choice, as_float, as_int
from abd_ray.defenses.base import Defense
from abd_ray.losses import kl_rows
from abd_ray.memo import RowMemo
from abd_ray.models import conv_layers
from abd_ray.registry import DEFENSES

# The paper shuffles the last 5 convolutions of a WRN-16-2, which has 16 (15 in a WRN-16-1): about the last
# third of the network. "auto" keeps that fraction of the depth, so WRN-16-x get the paper's 5 and a 3-convolution
# digits CNN gets 1. Measured on the digits teacher (cnn_l, badnet_grid): shuffling the last 1 gives a suspect that
# tells triggered from clean test inputs with ROC-AUC 0.997 (every triggered input masked, 13-20% of clean ones);
# shuffling 2 or 3 destroys the backdoor along with everything else (a constant prediction, AUC 0.64-0.76).
PAPER_N_SHUF_LAYER = 5
PAPER_N_CONV = 16


# --- the shuffled ensemble -----------------------------------------------------------------------------------------


def resolve_shuffled_layers(model: nn.Module, n_shuf_layer: int | str | None) -> list[int]:
    """Indices (input side = 0) of the convolutions to shuffle.

    Args:
        model: the teacher.
        n_shuf_layer: ``k > 0``: the last ``k`` convolutions; ``k < 0``: the first ``|k|``; ``"auto"`` / None:
            the paper's fraction of the depth, ``round(n_convs * 5 / 16)`` clipped to [1, n_convs - 1].

    Raises:
        ValueError: when ``|k|`` is 0 or exceeds the model's convolution count (the message gives the count).
    """
    n = len(conv_layers(model))
    if n == 0:
        raise ValueError("the Shuffling Vaccine needs a teacher with convolutions; this one has none")
    if n_shuf_layer is None or n_shuf_layer == "auto":
        k = max(1, min(round(n * PAPER_N_SHUF_LAYER / PAPER_N_CONV), n - 1))
        return list(range(n - k, n))
    k = int(n_shuf_layer)
    if k == 0 or abs(k) > n:
        raise ValueError(
            f"defense.n_shuf_layer={n_shuf_layer!r} does not fit a teacher with {n} convolutions; "
            f"use 1..{n} (the last k), -{n}..-1 (the first |k|) or 'auto'"
        )
    return list(range(n - k, n)) if k > 0 else list(range(-k))


def draw_permutations(
    model: nn.Module, layers: list[int], n_copies: int, generator: torch.Generator
) -> list[dict[int, torch.Tensor]]:
    """One random permutation of the input-channel axis per chosen layer per copy (CPU int64 tensors)."""
    convs = conv_layers(model)
    return [
        {i: torch.randperm(convs[i].weight.shape[1], generator=generator) for i in layers} for _ in range(n_copies)
    ]


def shuffled_copy(model: nn.Module, perms: dict[int, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose chosen convolutions have their weight's input-channel axis permuted.

    The input-channel axis is dimension 1 of a convolution weight; in a grouped convolution the same permutation
    applies within every group. The copy is frozen and in eval mode; ``model`` is not touched.
    """
    clone = copy.deepcopy(model)
    convs = conv_layers(clone)
    with torch.no_grad():
        for i, perm in perms.items():
            w = convs[i].weight
            w.copy_(w[:, perm.to(w.device)])
    clone.eval()
    clone.requires_grad_(False)
    return clone


def first_shuffled_stage(model: nn.Module, layers: list[int]) -> int:
    """The index of the first stage of ``model`` that holds a shuffled convolution; 0 when the model has no
    stages (the whole network then runs per copy)."""
    stages = getattr(model, "stages", None)
    if not callable(stages) or not hasattr(model, "forward_from") or not layers:
        return 0
    chosen = {id(c) for i, c in enumerate(conv_layers(model)) if i in layers}
    for j, stage in enumerate(stages()):
        if any(id(m) in chosen for m in stage.modules()):
            return j
    return 0


class ShuffledEnsemble(nn.Module):
    """The suspect model: the mean of the logits of channel-shuffled copies of a teacher.

    The copies are identical to the teacher up to the first stage that holds a shuffled convolution, so that
    trunk runs once, on the teacher (or is taken from the teacher's features, when the caller has them), and only
    the rest of the network runs per copy: with the paper's last third of a WRN shuffled, three copies cost about
    one teacher forward instead of three.

    Args:
        teacher: the teacher (left untouched; frozen and in eval mode, like the copies).
        perms: one ``{layer index: permutation}`` dict per copy.
    """

    def __init__(self, teacher: nn.Module, perms: list[dict[int, torch.Tensor]]) -> None:
        super().__init__()
        self.perms = [{i: p.clone() for i, p in d.items()} for d in perms]
        self.copies = nn.ModuleList(shuffled_copy(teacher, d) for d in perms)
        self.start = first_shuffled_stage(teacher, sorted({i for d in perms for i in d}))
        self.__dict__["_teacher"] = teacher  # not a submodule: the teacher is neither copied, moved nor saved here

    def train(self, mode: bool = True) -> ShuffledEnsemble:
        # The copies stand for the frozen teacher: their BatchNorms always use the running statistics.
        return super().train(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The shared stages' output (the input of stage ``start``) for inputs ``x``."""
        t = self._teacher
        h = (x - t.mean) / t.std
        for i in range(self.start):
            h = t.run_stage(i, h)
        return h

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean logits of the copies on ``x``; ``t_feats``, the teacher's stage outputs on ``x`` (as returned with
        ``return_features=True``), saves the shared trunk's forward."""
        if self.start == 0:
            return torch.stack([m(x) for m in self.copies]).mean(0)
        h = t_feats[self.start - 1] if t_feats is not None else self.trunk(x)
        if not torch.is_autocast_enabled(h.device.type):  # features kept from an autocast forward
            h = h.to(self.copies[0].fc.weight.dtype)
        return torch.stack([m.forward_from(h, self.start) for m in self.copies]).mean(0)


# --- the suspicion mask and divergence (pure functions) ------------------------------------------------------------


def suspect_mask(t_logits: torch.Tensor, u_logits: torch.Tensor) -> torch.Tensor:
    """``m_i = [argmax u_i == argmax t_i]``: the suspect model agrees with the teacher (bool, shape (N,))."""
    return u_logits.argmax(1) == t_logits.argmax(1)


def suspect_divergence(t_logits: torch.Tensor, u_logits: torch.Tensor) -> torch.Tensor:
    """``d_i``: the mean over classes of the terms of ``KL(softmax(t_i) || softmax(u_i))`` (shape (N,))."""
    log_t = F.log_softmax(t_logits, dim=1)
    log_u = F.log_softmax(u_logits, dim=1)
    return kl_rows(log_t, log_u, over_classes="mean")


def masked_divergence_term(
    t_logits: torch.Tensor, u_logits: torch.Tensor, coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generator-loss term ``-coef * sum(m * d) / sum(m)`` (0 when nothing is masked), with ``m`` and ``d``."""
    m = suspect_mask(t_logits, u_logits)
    d = suspect_divergence(t_logits, u_logits)
    if not bool(m.any()):
        return d.sum() * 0.0, m, d  # keeps the graph and device, contributes nothing
    mf = m.to(d.dtype)
    return -coef * (mf * d).sum() / mf.sum(), m, d


FIXED_MODES = ("drop", "capped", "ascent")


def reweighted_loss(
    per_sample: torch.Tensor, mask: torch.Tensor, coef: float, mode: str = "ascent", cap: float = math.inf
) -> torch.Tensor:
    """The student's batch loss on fixed or banked data, from per-sample KD losses ``l`` and the suspect mask.

    - ``ascent`` (the paper): ``mean(l over unmasked) - coef * mean(l over masked)``. Unbounded: the student is
      pushed ever further from the teacher on masked samples.
    - ``capped``: ``mean(l over unmasked) - coef * mean(min(l, cap) over masked)``: a masked sample is pushed away
      until its loss reaches ``cap``, then left alone.
    - ``drop``: ``mean(l over unmasked)``: masked samples teach nothing.

    An empty group contributes 0.
    """
    zero = per_sample.sum() * 0.0
    clean = per_sample[~mask].mean() if bool((~mask).any()) else zero
    if mode == "drop" or not bool(mask.any()):
        return clean
    sus = per_sample[mask]
    if mode == "capped":
        sus = sus.clamp(max=cap)
    elif mode != "ascent":
        raise ValueError(f"fixed_mode={mode!r}; allowed: {', '.join(FIXED_MODES)}")
    return clean - coef * sus.mean()


def tail_ratio(values: torch.Tensor, n_std: float = 3.0) -> float:
    """Fraction of ``values`` below ``mean - n_std * std`` (0 when they do not vary)."""
    v = values.double().flatten()
    if v.numel() < 2:
        return 0.0
    std = v.std()
    if not torch.isfinite(std) or std == 0:
        return 0.0
    return float((v < v.mean() - n_std * std).double().mean())


def log10_kl(t_logits: torch.Tensor, u_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log10 KL(softmax(t) || softmax(u))`` in float64; an exact 0 is floored at 1e-30."""
    log_t = F.log_softmax(t_logits.double(), dim=1)
    log_u = F.log_softmax(u_logits.double(), dim=1)
    kl = kl_rows(log_t, log_u).clamp_min(1e-30)
    return kl.log10()


def check_suspect(
    t_logits: torch.Tensor, u_logits: torch.Tensor, threshold: float = 0.02, n_std: float = 3.0
) -> tuple[bool, float]:
    """The vaccine check on one draw: accept when the low tail of the log10 KL holds more than ``threshold``.

    A suspect model that separates backdoor-dominated inputs gives them a far smaller divergence than the rest,
    which shows up as a heavy low tail in log space; a suspect that does not gives a unimodal, light-tailed spread.

    Returns:
        (accepted, tail ratio).
    """
    r = tail_ratio(log10_kl(t_logits, u_logits), n_std)
    return r > threshold, r


# --- detection diagnostics (evaluation only: they use test data) ---------------------------------------------------


def roc_auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """ROC-AUC of a score that should be higher on positives: P(pos > neg) + 0.5 P(tie), by ranks."""
    pos, neg = scores_pos.double().flatten(), scores_neg.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    neg_sorted = neg.sort().values
    below = torch.searchsorted(neg_sorted, pos, right=False)  # negatives strictly below each positive
    at_or_below = torch.searchsorted(neg_sorted, pos, right=True)
    wins = below.double() + 0.5 * (at_or_below - below).double()
    return float(wins.sum() / (pos.numel() * neg.numel()))


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def detection_diagnostics(
    teacher: nn.Module,
    suspect: nn.Module,
    x_clean: torch.Tensor,
    x_poison: torch.Tensor,
    batch_size: int = 512,
) -> dict[str, float]:
    """How well the suspect model tells poisoned from clean test inputs (evaluation only).

    Args:
        teacher: the teacher.
        suspect: the shuffled ensemble (or any model standing for it).
        x_clean: clean test inputs.
        x_poison: triggered test inputs.
        batch_size: evaluation batch size.

    Returns:
        ``sv_det_auc``: ROC-AUC of poisoned vs clean with the negated divergence as the score (a poisoned input
        should have the smaller divergence); ``sv_det_acc`` (%): balanced accuracy of SV's own rule, "poisoned iff
        the suspect agrees with the teacher"; ``sv_div_clean`` / ``sv_div_poison``: mean divergence ``d`` on each;
        ``sv_mask_clean`` / ``sv_mask_poison`` (%): how often each is masked.
    """
    tc, uc = _logits(teacher, x_clean, batch_size), _logits(suspect, x_clean, batch_size)
    tp, up = _logits(teacher, x_poison, batch_size), _logits(suspect, x_poison, batch_size)
    dc, dp = suspect_divergence(tc, uc), suspect_divergence(tp, up)
    mc, mp = suspect_mask(tc, uc).double(), suspect_mask(tp, up).double()
    nan = float("nan")
    mask_clean = float(mc.mean()) if mc.numel() else nan
    mask_poison = float(mp.mean()) if mp.numel() else nan
    return {
        "sv_det_auc": roc_auc(-dp, -dc),
        "sv_det_acc": 100.0 * (mask_poison + (1.0 - mask_clean)) / 2.0,
        "sv_div_clean": float(dc.double().mean()) if dc.numel() else nan,
        "sv_div_poison": float(dp.double().mean()) if dp.numel() else nan,
        "sv_mask_clean": 100.0 * mask_clean,
        "sv_mask_poison": 100.0 * mask_poison,
    }


# --- the defense -----------------------------------------------------------------------------------------------------


def _seed_from(generator: torch.Generator | None) -> int:
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


@DEFENSES.register("sv", paper="Hong et al., ICML 2023", component="vaccine")
class ShufflingVaccine(Defense):
    """The Shuffling Vaccine.

    Hyperparameters (``defense.<key>``):
        coef: strength. Default 4.0, measured on digits (zskt / badnet_grid, seed 0, 3000 steps, SV alone, the
            last 1 of 3 convolutions shuffled): coef 1 -> clean_acc 96.9 / asr 90.6, coef 4 -> 97.3 / 22.2,
            coef 10 -> 96.9 / 31.9, against 98.0 / 99.8 undefended. The paper's sweeps used 0.1; set it for
            CIFAR-scale reproductions.
        n_shuf_ens: shuffled copies in the ensemble. Default 6 (paper: 3), measured on digits (same setting, coef
            4): 3 copies -> 97.3 / 22.2, 4 -> 97.8 / 90.6, 6 -> 93.8 / 5.4 and, in a rerun whose floating-point
            order differed, 96.7 / 1.2 at step 2500. With few copies the suspect is one permutation's accident
            and the generator learns to slip past it; the runs are chaotic (one seed, two outcomes), so these
            figures are indicative. Copies are cheap: only the shuffled stages run per copy.
        n_shuf_layer: convolutions to shuffle: ``k > 0`` the last k, ``k < 0`` the first |k|, or ``"auto"``
            (default): the paper's share of the depth, ``round(n_convs * 5 / 16)`` (WRN-16-2: the paper's 5;
            the digits CNNs: the last 1 of 3).
        no_shuf_grad: when true the generator term's gradient flows through the teacher only, not through the
            shuffled copies (paper default: false, it flows through both).
        pseudo_test_batches: batches collected for the vaccine check; 0 (default, as in the paper's main runs)
            skips the check and keeps SV on from the first step.
        check_skip: synthesized batches ignored before collecting (the generator's first outputs are noise): 10.
        check_tries: permutation draws tried by the check before SV is switched off for the run: 8.
        tail_threshold: tail ratio a draw must exceed to be accepted: 0.02.
        fixed_mode: how the student's loss treats masked samples on fixed or banked data (ood, clean,
            deepinversion, cmi's bank): ``capped`` (default), ``drop`` or ``ascent`` (the paper's formula; see
            :func:`reweighted_loss`). Measured on digits (deepinversion / badnet_grid, seed 0, 3000 steps, SV alone
            at coef 4, about 24% of bank samples masked; undefended 99.1 / 99.8): ascent 10.2 / 0.0 (the student
            collapses; at the paper's coef 0.1 still 28.0 / 0.0), drop 97.3 / 54.6, capped 91.8 / 4.0.
        fixed_cap: the per-sample loss at which ``capped`` stops pushing a masked sample away: ``"auto"``
            (default) = ln(number of classes), the KL from a confident teacher to a uniform student at T = 1.
    """

    name = "sv"
    defaults: dict[str, Any] = {
        "coef": 4.0,
        "n_shuf_ens": 6,
        "n_shuf_layer": "auto",
        "no_shuf_grad": False,
        "pseudo_test_batches": 0,
        "check_skip": 10,
        "check_tries": 8,
        "tail_threshold": 0.02,
        "fixed_mode": "capped",
        "fixed_cap": "auto",
    }

    def validate(self) -> None:
        p = self.params
        p["coef"] = as_float("coef", p["coef"], lo=0.0)
        p["n_shuf_ens"] = as_int("n_shuf_ens", p["n_shuf_ens"], lo=1)
        if p["n_shuf_layer"] is None or p["n_shuf_layer"] == "auto":
            p["n_shuf_layer"] = "auto"
        else:
            k = as_int("n_shuf_layer", p["n_shuf_layer"])
            if k == 0:
                raise ValueError("defense.n_shuf_layer=0 shuffles nothing; use k > 0 (last k), k < 0 or 'auto'")
            p["n_shuf_layer"] = k
        p["no_shuf_grad"] = as_bool("no_shuf_grad", p["no_shuf_grad"])
        p["pseudo_test_batches"] = as_int("pseudo_test_batches", p["pseudo_test_batches"], lo=0)
        p["check_skip"] = as_int("check_skip", p["check_skip"], lo=0)
        p["check_tries"] = as_int("check_tries", p["check_tries"], lo=1)
        p["tail_threshold"] = as_float("tail_threshold", p["tail_threshold"], lo=0.0, hi=1.0, hi_open=True)
        p["fixed_mode"] = as_choice("fixed_mode", p["fixed_mode"], FIXED_MODES)
        if p["fixed_cap"] != "auto":
            p["fixed_cap"] = as_float("fixed_cap", p["fixed_cap"], lo=0.0, lo_open=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.teacher: nn.Module | None = None
        self.suspect: ShuffledEnsemble | None = None
        self.layers: list[int] = []
        self.fixed_data = False
        self._cap = math.inf
        self._rng = torch.Generator()
        # Vaccine-check state: SV waits for the check when pseudo_test_batches > 0.
        self.active = self.params["pseudo_test_batches"] == 0
        self._check_done = self.params["pseudo_test_batches"] == 0
        self._seen = 0
        self._bank_x: list[torch.Tensor] = []
        self._bank_t: list[torch.Tensor] = []
        self.check_tries = 0
        self.check_ratio = float("nan")
        self.check_accepted = False
        # Recent per-batch statistics, for metrics().
        self._masked: deque[float] = deque(maxlen=100)
        self._div: deque[float] = deque(maxlen=100)
        self._pending_state: dict[str, Any] | None = None
        self._memo = RowMemo()  # the suspect's logits per stored sample, on unaugmented fixed data

    # -- hooks ----------------------------------------------------------------------------------------------------

    def check_teacher(self, teacher: nn.Module) -> None:
        resolve_shuffled_layers(teacher, self.params["n_shuf_layer"])

    def bind(
        self,
        teacher: nn.Module,
        student: nn.Module,
        shape: tuple[int, int, int],
        num_classes: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        *,
        fixed_data: bool = False,
    ) -> None:
        self.teacher = teacher
        self.fixed_data = bool(fixed_data)
        cap = self.params["fixed_cap"]
        self._cap = math.log(num_classes) if cap == "auto" else float(cap)
        self.layers = resolve_shuffled_layers(teacher, self.params["n_shuf_layer"])
        self._rng.manual_seed(_seed_from(generator))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        else:
            self._build(draw_permutations(teacher, self.layers, self.params["n_shuf_ens"], self._rng))

    def _build(self, perms: list[dict[int, torch.Tensor]]) -> None:
        assert self.teacher is not None, "bind() first"
        device = next(self.teacher.parameters()).device
        self.suspect = ShuffledEnsemble(self.teacher, perms).to(device)
        self._memo.clear()  # rows of the previous suspect

    def observe(self, x: torch.Tensor, t_logits: torch.Tensor, step: int) -> None:
        if self._check_done:
            return
        self._seen += 1
        if self._seen <= self.params["check_skip"]:
            return
        self._bank_x.append(x.detach())
        self._bank_t.append(t_logits.detach().float())
        if len(self._bank_x) >= self.params["pseudo_test_batches"]:
            self._run_check()

    @torch.no_grad()
    def _run_check(self) -> None:
        assert self.teacher is not None and self.suspect is not None, "bind() first"
        x = torch.cat(self._bank_x)
        t = torch.cat(self._bank_t)
        for attempt in range(1, self.params["check_tries"] + 1):
            if attempt > 1:
                self._build(draw_permutations(self.teacher, self.layers, self.params["n_shuf_ens"], self._rng))
            u = torch.cat([self.suspect(x[i : i + 512]).float() for i in range(0, len(x), 512)])
            ok, ratio = check_suspect(t, u, self.params["tail_threshold"])
            self.check_tries, self.check_ratio = attempt, ratio
            if ok:
                break
        self.check_accepted = ok
        self.active = ok
        self._check_done = True
        self._bank_x, self._bank_t = [], []

    def _suspect_logits(
        self, x: torch.Tensor, with_grad: bool, t_feats: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        assert self.suspect is not None, "bind() first"
        if with_grad:
            return self.suspect(x, t_feats)
        with torch.no_grad():
            return self.suspect(x, t_feats)

    def generator_term(
        self, x: torch.Tensor, t_logits: torch.Tensor, t_feats: list[torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        if not self.active:
            return None
        u = self._suspect_logits(x, with_grad=not self.params["no_shuf_grad"], t_feats=t_feats)
        term, m, d = masked_divergence_term(t_logits, u, self.params["coef"])
        self._masked.append(float(m.float().mean()))
        self._div.append(float(d.detach().mean()))
        return term

    def student_loss(
        self,
        per_sample: torch.Tensor,
        x: torch.Tensor,
        t_logits: torch.Tensor,
        t_feats: list[torch.Tensor] | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not (self.active and self.fixed_data):
            return per_sample.mean()
        if keys is not None:  # stored samples fed unchanged: the frozen suspect's logits, once per sample
            u = self._memo.rows(keys, x, lambda xs: self._suspect_logits(xs, with_grad=False))
        else:
            u = self._suspect_logits(x, with_grad=False, t_feats=t_feats)
        m = suspect_mask(t_logits.detach(), u)
        self._masked.append(float(m.float().mean()))
        self._div.append(float(suspect_divergence(t_logits.detach(), u).mean()))
        return reweighted_loss(per_sample, m, self.params["coef"], self.params["fixed_mode"], self._cap)

    def metrics(self) -> dict[str, float]:
        out = {
            "sv_active": float(self.active),
            "sv_masked_frac": float(sum(self._masked) / len(self._masked)) if self._masked else 0.0,
            "sv_div": float(sum(self._div) / len(self._div)) if self._div else 0.0,
        }
        if self.params["pseudo_test_batches"] > 0:
            out.update(
                sv_check_done=float(self._check_done),
                sv_check_accepted=float(self.check_accepted),
                sv_check_tries=float(self.check_tries),
                sv_tail_ratio=self.check_ratio if not math.isnan(self.check_ratio) else -1.0,
            )
        return out

    def diagnose(self, x_clean: torch.Tensor, x_poison: torch.Tensor) -> dict[str, float]:
        """:func:`detection_diagnostics` of the bound teacher and its current suspect model."""
        assert self.teacher is not None and self.suspect is not None, "bind() first"
        return detection_diagnostics(self.teacher, self.suspect, x_clean, x_poison)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # A check interrupted while collecting starts collecting again after a resume (the bank is not saved).
        return {
            "perms": [{str(i): p.clone() for i, p in d.items()} for d in (self.suspect.perms if self.suspect else [])],
            "active": self.active,
            "check_done": self._check_done,
            "check_tries": self.check_tries,
            "check_ratio": self.check_ratio,
            "check_accepted": self.check_accepted,
            "rng": self._rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.teacher is None:
            self._pending_state = state  # applied at bind(), which needs the teacher
            return
        perms = [{int(i): torch.as_tensor(p) for i, p in d.items()} for d in state.get("perms", [])]
        if perms:
            self._build(perms)
        self.active = bool(state["active"])
        self._check_done = bool(state["check_done"])
        self.check_tries = int(state["check_tries"])
        self.check_ratio = float(state["check_ratio"])
        self.check_accepted = bool(state["check_accepted"])
        if "rng" in state:
            self._rng.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
        self._seen, self._bank_x, self._bank_t = 0, [], []
