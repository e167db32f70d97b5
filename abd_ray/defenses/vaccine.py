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

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from abd_ray.defenses._params import as_bool, as_choice, as_float, as_int
from abd_ray.defenses.base import Defense, child_seed
from abd_ray.defenses.diagnostics import detection_diagnostics
from abd_ray.defenses.shuffle import LAYER_COUNTS, ShuffledEnsemble, draw_permutations, resolve_shuffled_layers
from abd_ray.defenses.vaccine_check import CHECK_RULES, check_suspect
from abd_ray.defenses.vaccine_math import (
    FIXED_MODES,
    masked_divergence_term,
    reweighted_loss,
    suspect_divergence,
    suspect_mask,
)
from abd_ray.memo import RowMemo
from abd_ray.registry import DEFENSES

if TYPE_CHECKING:
    from abd_ray.engine.build import Evaluation
    from abd_ray.synthesizers.batch import Batch

# Which of SV's two forms act on fixed or banked data (on fresh generator outputs only the generator term exists).
BANK_MODES = ("synth", "term", "reweight", "both")


@DEFENSES.register("sv")
class ShufflingVaccine(Defense):
    """The Shuffling Vaccine. The measurements behind each default are in ``docs/defaults.md``.

    Hyperparameters (``defense.<key>``):
        coef: strength. Default 4.0, measured on digits; the paper's sweeps used 0.1: set it for CIFAR-scale
            reproductions.
        n_shuf_ens: shuffled copies in the ensemble. Default 6 (paper: 3): with few copies the suspect is one
            permutation's accident and the generator learns to slip past it. Copies are cheap: only the shuffled
            stages run per copy.
        n_shuf_layer: convolutions to shuffle: ``k > 0`` the last k, ``k < 0`` the first |k|, or ``"auto"``
            (default): the paper's share of the depth, ``round(n_convs * 5 / 16)`` (WRN-16-2: the paper's 5;
            the digits CNNs: the last 1 of 3).
        layer_count: which convolutions n_shuf_layer counts: ``all_convs`` (default: every convolution, in
            registration order) or ``named_conv`` (the original code's rule, state-dict keys containing "conv":
            the same 16 on a WRN-16-2, a ResNet's projection shortcuts skipped, nothing on a VGG, which is refused).
        no_shuf_grad: when true the generator term's gradient flows through the teacher only, not through the
            shuffled copies (paper default: false, it flows through both).
        pseudo_test_batches: batches collected for the vaccine check; 0 (default, as in the paper's main runs)
            skips the check and keeps SV on from the first step.
        check_skip: synthesized batches ignored before collecting (the generator's first outputs are noise): 10.
        check_tries: permutation draws tried by the check before SV is switched off for the run: 8.
        tail_threshold: tail ratio a draw must exceed to be accepted: 0.02.
        check_rule: how the check picks a draw: ``tail`` (default, the paper's: the first draw whose tail ratio
            passes ``tail_threshold``, else SV is off for the run) or ``agreement``: of ``check_tries`` draws, the
            one whose suspect agrees with the teacher on the most collected samples (the draw that keeps the
            backdoor's shortcut where the shuffle destroyed the ordinary features); SV then stays on.
        fixed_mode: how the student's loss treats masked samples on fixed or banked data (ood, clean,
            deepinversion, cmi's bank): ``capped`` (default: the paper's ``ascent`` collapses the student),
            ``drop`` or ``ascent`` (see :func:`~abd_ray.defenses.vaccine_math.reweighted_loss`).
        fixed_cap: the per-sample loss at which ``capped`` stops pushing a masked sample away: ``"auto"``
            (default) = ln(number of classes), the KL from a confident teacher to a uniform student at T = 1.
        gen_mode: how the student's KD treats masked samples of a generator's fresh outputs (zskt, dfad, dafl):
            ``plain`` (default, the paper: only the generator term acts there) or one of ``fixed_mode``'s forms,
            which adds the fixed-data reweighting (same ``coef`` and ``fixed_cap``) to the generator term.
        bank_mode: which of SV's forms act on fixed or banked data: ``synth`` (default: what each synthesizer
            does today: cmi's synthesis gets the generator term and its KD the reweighting, deepinversion the
            reweighting only, ood and clean the reweighting), ``term`` (the synthesis term only, plain KD: the
            original's CMI and DeepInversion; ood and clean have no synthesis, so SV does nothing there),
            ``reweight`` (the reweighting only) or ``both``.

    Diagnostics (``probe``, where the attack is known): ``sv_auc``, the ROC-AUC of the suspect's divergence ``d``
    (lower = more suspect) with the triggered test images as positives and the clean test set as negatives (1.0:
    every triggered image is more suspect than every clean one), and ``sv_mask_poison`` / ``sv_mask_clean``, the %
    of each the mask flags. Measured once per permutation draw.
    """

    wants_teacher_features = True  # the suspect then starts from the teacher's trunk output instead of re-running it
    defaults: dict[str, Any] = {
        "coef": 4.0,
        "n_shuf_ens": 6,
        "n_shuf_layer": "auto",
        "no_shuf_grad": False,
        "pseudo_test_batches": 0,
        "check_skip": 10,
        "check_tries": 8,
        "tail_threshold": 0.02,
        "check_rule": "tail",
        "fixed_mode": "capped",
        "fixed_cap": "auto",
        "layer_count": "all_convs",
        "bank_mode": "synth",
        "gen_mode": "plain",
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
        p["check_rule"] = as_choice("check_rule", p["check_rule"], CHECK_RULES)
        p["fixed_mode"] = as_choice("fixed_mode", p["fixed_mode"], FIXED_MODES)
        if p["fixed_cap"] != "auto":
            p["fixed_cap"] = as_float("fixed_cap", p["fixed_cap"], lo=0.0, lo_open=True)
        p["layer_count"] = as_choice("layer_count", p["layer_count"], LAYER_COUNTS)
        p["bank_mode"] = as_choice("bank_mode", p["bank_mode"], BANK_MODES)
        p["gen_mode"] = as_choice("gen_mode", p["gen_mode"], ("plain", *FIXED_MODES))

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
        self.check_agreement = float("nan")  # the kept draw's agreement with the teacher on the collected samples
        # Recent per-batch statistics, for metrics().
        self._masked: deque[float] = deque(maxlen=100)
        self._div: deque[float] = deque(maxlen=100)
        self._memo = RowMemo()  # the suspect's logits per stored sample, on unaugmented fixed data
        self._probe: dict[str, float] | None = None  # the detection diagnostics of the current permutation draw

    # -- hooks ----------------------------------------------------------------------------------------------------

    def check_teacher(self, teacher: nn.Module) -> None:
        resolve_shuffled_layers(teacher, self.params["n_shuf_layer"], self.params["layer_count"])

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
        self.teacher = teacher
        self.fixed_data = bool(fixed_data)
        cap = self.params["fixed_cap"]
        self._cap = math.log(num_classes) if cap == "auto" else float(cap)
        self.layers = resolve_shuffled_layers(teacher, self.params["n_shuf_layer"], self.params["layer_count"])
        self._rng.manual_seed(child_seed(generator))
        self._build(draw_permutations(teacher, self.layers, self.params["n_shuf_ens"], self._rng))

    def _build(self, perms: list[dict[int, torch.Tensor]]) -> None:
        assert self.teacher is not None, "bind() first"
        device = next(self.teacher.parameters()).device
        self.suspect = ShuffledEnsemble(self.teacher, perms).to(device)
        self._memo.clear()  # rows of the previous suspect
        self._probe = None

    def observe(self, batch: Batch, step: int) -> None:
        if self._check_done:
            return
        self._seen += 1
        if self._seen <= self.params["check_skip"]:
            return
        self._bank_x.append(batch.x.detach())
        self._bank_t.append(batch.t_logits.detach().float())
        if len(self._bank_x) >= self.params["pseudo_test_batches"]:
            self._run_check()

    @torch.no_grad()
    def _run_check(self) -> None:
        assert self.teacher is not None and self.suspect is not None, "bind() first"
        x = torch.cat(self._bank_x)
        t = torch.cat(self._bank_t)
        kept: tuple[float, float, list[dict[int, torch.Tensor]]] | None = None  # agreement rule: the best so far
        for attempt in range(1, self.params["check_tries"] + 1):
            if attempt > 1:
                self._build(draw_permutations(self.teacher, self.layers, self.params["n_shuf_ens"], self._rng))
            u = torch.cat([self.suspect(x[i : i + 512]).float() for i in range(0, len(x), 512)])
            ok, ratio = check_suspect(t, u, self.params["tail_threshold"])
            agreement = float(suspect_mask(t, u).float().mean())
            self.check_tries, self.check_ratio, self.check_agreement = attempt, ratio, agreement
            if self.params["check_rule"] == "tail":
                if ok:
                    break
            elif kept is None or agreement > kept[0]:
                kept = (agreement, ratio, self.suspect.perms)
        if kept is not None:
            self.check_agreement, self.check_ratio, ok = kept[0], kept[1], True
            self._build(kept[2])
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

    def _wants_term(self, batch: Batch) -> bool:
        if not self.fixed_data:
            return True
        mode = self.params["bank_mode"]
        return mode in ("term", "both") or (mode == "synth" and not batch.term_optional)

    def generator_term(self, batch: Batch) -> torch.Tensor | None:
        if not (self.active and self._wants_term(batch)):
            return None
        u = self._suspect_logits(batch.x, with_grad=not self.params["no_shuf_grad"], t_feats=batch.t_feats)
        term, m, d = masked_divergence_term(batch.t_logits, u, self.params["coef"])
        self._masked.append(float(m.float().mean()))
        self._div.append(float(d.detach().mean()))
        return term

    def _student_mode(self) -> str | None:
        """The reweighting form of the student's KD on this run's data (a ``FIXED_MODES`` name), or None: plain."""
        if not self.active:
            return None
        if self.fixed_data:
            return None if self.params["bank_mode"] == "term" else self.params["fixed_mode"]
        return None if self.params["gen_mode"] == "plain" else self.params["gen_mode"]

    def student_loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        mode = self._student_mode()
        if mode is None:
            return per_sample.mean()
        x, t_logits = batch.x, batch.t_logits
        if batch.keys is not None:  # stored samples fed unchanged: the frozen suspect's logits, once per sample
            u = self._memo.rows(batch.keys, x, lambda xs: self._suspect_logits(xs, with_grad=False))
        else:
            u = self._suspect_logits(x, with_grad=False, t_feats=batch.t_feats)
        m = suspect_mask(t_logits.detach(), u)
        self._masked.append(float(m.float().mean()))
        self._div.append(float(suspect_divergence(t_logits.detach(), u).mean()))
        return reweighted_loss(per_sample, m, self.params["coef"], mode, self._cap)

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
                sv_check_agreement=self.check_agreement if not math.isnan(self.check_agreement) else -1.0,
            )
        return out

    @torch.no_grad()
    def probe(self, evaluation: Evaluation, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        if self.suspect is None or self.teacher is None or len(evaluation.x_poison) == 0:
            return {}
        if self._probe is None:  # the suspect is frozen between draws: one measurement per draw
            det = detection_diagnostics(self.teacher, self.suspect, evaluation.x_test, evaluation.x_poison)
            self._probe = {k: det[src] for k, src in
                           (("sv_auc", "sv_det_auc"), ("sv_mask_poison", "sv_mask_poison"),
                            ("sv_mask_clean", "sv_mask_clean"))}
        return dict(self._probe)

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
            "check_agreement": self.check_agreement,
            "rng": self._rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.teacher is not None, "bind() before load_state_dict()"
        perms = [{int(i): torch.as_tensor(p) for i, p in d.items()} for d in state.get("perms", [])]
        if perms:
            self._build(perms)
        self.active = bool(state["active"])
        self._check_done = bool(state["check_done"])
        self.check_tries = int(state["check_tries"])
        self.check_ratio = float(state["check_ratio"])
        self.check_accepted = bool(state["check_accepted"])
        self.check_agreement = float(state.get("check_agreement", float("nan")))
        if "rng" in state:
            self._rng.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
        self._seen, self._bank_x, self._bank_t = 0, [], []
