"""Self-Retrospection (SR) of ABD: Hong et al., "Revisiting Data-Free Knowledge Distillation with Poisoned
Teachers", ICML 2023 (ALGORITHMS.md section 4.2).

The student looks back at itself for a universal perturbation that flips its predictions (a candidate trigger)
and unlearns it with a bilevel update, in the manner of I-BAU (Zeng et al., ICLR 2022) but without labels:

1. ``delta`` (one image's shape) takes ``inner_round`` Adam steps that maximise the KD divergence between
   ``p(x)`` and ``p(x + delta)`` minus an L2 penalty, ``p`` the student (or the teacher);
2. the outer loss ``KL(S(x) || S(x'))``, ``x'`` the batch with ``delta`` added to a random ``hg_out_portion`` of
   it, is differentiated with respect to the student's parameters through the inner optimum
   ``delta*(theta) = argmin -KL(S(x) || S(x + delta)) + pert_l2 ||delta||^2`` by the fixed-point method
   (:mod:`abd_ray.defenses.hypergrad`), and the result is written into the student's ``.grad``;
3. the KD loop back-propagates its ordinary loss on top and steps.

SR costs several student passes per step, so it runs as a short second stage at the end of the budget with a
fresh learning rate (``sup_resume_lr``), as the paper did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.defenses._params import as_bool, as_choice, as_float, as_int
from abd_ray.defenses.base import Defense, child_seed
from abd_ray.defenses.hypergrad import fixed_point_hypergrad
from abd_ray.losses import kl_rows
from abd_ray.metrics import predict
from abd_ray.registry import DEFENSES

if TYPE_CHECKING:
    from abd_ray.engine.build import Evaluation

# delta "starts at zero"; but zero is an exact minimum of the divergence, where its gradient vanishes and Adam
# would never move. A start this small is zero for every practical purpose and breaks the symmetry; Adam's
# scale-free steps then move it by about pert_lr from the first step.
_DELTA_INIT_STD = 1e-3
_SR_LOSSES = ("batchmean", "mean", "batchmean_t2")
_PROBE_BATCH = 512


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p) || softmax(q))``."""
    return kl_rows(F.log_softmax(p_logits, dim=1), q_logits=q_logits)


@dataclass(frozen=True)
class SRForm:
    """How SR adds a perturbation to an input and measures a change of prediction: one form shared by the
    search, the hypergradient's inner and outer losses, the flip rate and the probes.

    Attributes:
        std: None: ``delta`` is a pixel-space edit, applied as ``clamp(x + delta, 0, 1)`` (a candidate trigger must
            be an image edit, so the search cannot win by pushing inputs outside the data's range). A per-channel
            std (1, C, 1, 1): ``delta`` lives in the model's normalised input space, applied as ``x + delta * std``
            with no clamp (the original's form: its generator's output is the classifier's input).
        loss: ``batchmean`` (KL summed over classes, mean over the batch), ``mean`` (mean over batch and classes)
            or ``batchmean_t2`` (batchmean times ``T**2``).
        T: the temperature the logits are divided by before the KL.
    """

    std: torch.Tensor | None = None
    loss: str = "batchmean"
    T: float = 1.0

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` with ``delta`` added."""
        if self.std is None:
            return (x + delta).clamp(0.0, 1.0)
        return x + delta * self.std

    def pixel(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` as a pixel-space change (before any clamp)."""
        return delta if self.std is None else delta * self.std

    def divergence(self, p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        """The batch's ``KL(softmax(p / T) || softmax(q / T))`` in this form's reduction."""
        if self.T != 1.0:
            p_logits, q_logits = p_logits / self.T, q_logits / self.T
        if self.loss == "mean":
            return kl_rows(F.log_softmax(p_logits, dim=1), q_logits=q_logits, over_classes="mean").mean()
        d = _kl_rows(p_logits, q_logits).mean()
        return d * (self.T * self.T) if self.loss == "batchmean_t2" else d


_PIXEL = SRForm()


class _InMode:
    """Run a model in eval mode (or, with ``train``, train mode) inside the block and restore its mode afterwards.

    Eval mode is the default of SR's forwards: they must neither move BatchNorm running statistics (they would
    carry the candidate trigger into test-time behaviour) nor depend on which other samples share the batch (a
    universal perturbation added to a whole batch is partly absorbed by batch statistics). Train mode is the
    original's hypergradient (``sr_bn: train``).
    """

    def __init__(self, model: nn.Module, train: bool = False) -> None:
        self.model = model
        self.train = train

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.train(self.train)
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _logits(model: nn.Module, x: torch.Tensor, grad: bool) -> torch.Tensor:
    """``model(x)``, with or without a graph."""
    if grad:
        return model(x)
    with torch.no_grad():
        return model(x)


def find_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    inner_round: int = 10,
    lr: float = 0.1,
    l2: float = 1e-3,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
    form: SRForm = _PIXEL,
    init: str = "noise",
) -> torch.Tensor:
    """A universal perturbation that makes ``model`` change its mind on ``x``.

    Maximises ``KL(p(x) || p(x + delta)) - l2 * ||delta||^2`` over one image-shaped ``delta`` by Adam, the model in
    eval mode.

    Args:
        model: the model whose predictions are to be flipped (``p``); only ``delta`` receives gradients.
        x: a batch (N, C, H, W).
        inner_round: Adam steps.
        lr: Adam learning rate.
        l2: L2 penalty weight.
        generator: seeds the tiny symmetry-breaking start.
        ref: ``model``'s eval-mode logits on ``x``, when the caller has them (computed here otherwise).
        form: how ``delta`` is added and the KL reduced.
        init: ``noise`` (std 1e-3, drawn from ``generator``) or ``zero`` (exact zeros, no draw).

    Returns:
        ``delta`` of shape (1, C, H, W), detached.
    """
    with _InMode(model):
        if ref is None:
            with torch.no_grad():
                ref = model(x)
        if init == "noise":
            noise = torch.randn((1, *x.shape[1:]), generator=generator, dtype=x.dtype)
            delta = (noise * _DELTA_INIT_STD).to(x.device).requires_grad_(True)
        else:
            delta = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(inner_round):
            loss = -form.divergence(ref, model(form.apply(x, delta))) + l2 * delta.pow(2).sum()
            (g,) = torch.autograd.grad(loss, [delta])
            delta.grad = g
            opt.step()
    return delta.detach()


def retrospection_hypergrad(
    student: nn.Module,
    x: torch.Tensor,
    delta: torch.Tensor,
    portion: float = 0.02,
    l2: float = 1e-3,
    K: int = 5,
    step: float = 0.1,
    generator: torch.Generator | None = None,
    reference: torch.Tensor | None = None,
    *,
    form: SRForm = _PIXEL,
    rounding: str = "round",
    train_bn: bool = False,
    detach_clean: bool = False,
    ref_grad: bool = False,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The gradient of SR's outer loss with respect to the student's parameters, through ``delta*``.

    Args:
        student: the student (its trainable parameters are the hyperparameters of the bilevel problem).
        x: the batch.
        delta: the inner solution found by :func:`find_perturbation`.
        portion: fraction of the batch that carries ``delta`` in the outer loss (at least one sample).
        l2: the inner problem's L2 penalty.
        K: fixed-point iterations.
        step: the fixed-point map's gradient step.
        generator: picks the perturbed samples.
        reference: logits the perturbed batch is pulled towards; default the student's own clean logits
            ``S(x)`` (ALGORITHMS.md). Passing the teacher's logits ``T(x)`` gives I-BAU's form of the outer
            loss, whose unperturbed samples then carry the ordinary KD loss into the bilevel objective.
        form: how ``delta`` is added and the KL reduced.
        rounding: how many samples carry ``delta``: ``round`` (``round(n * portion)``) or ``floor``
            (``int(n * portion)``), at least one either way.
        train_bn: the inner and outer forwards in train mode (batch statistics, running statistics updated), as
            the original; default eval mode.
        detach_clean: the inner loss's clean side ``S(x)`` without gradient.
        ref_grad: with the student's own reference (``reference`` None), ``S(x)`` keeps its gradient in the
            outer loss.

    Returns:
        One gradient per trainable parameter, and statistics (the outer loss, how many samples were perturbed).
    """
    if ref_grad and reference is not None:
        raise ValueError("ref_grad needs the student's own reference (reference=None)")
    params = [p for p in student.parameters() if p.requires_grad]
    n = x.shape[0]
    rows = int(round(portion * n)) if rounding == "round" else int(portion * n)
    k = max(1, min(n, rows))
    idx = torch.randperm(n, generator=generator)[:k].to(x.device)
    sel = torch.zeros(n, 1, 1, 1, dtype=x.dtype, device=x.device)
    sel[idx] = 1.0
    seen: list[torch.Tensor] = []

    with _InMode(student, train=train_bn):
        # A fixed reference is computed once; the student's own one, in train mode or with its gradient, is taken
        # inside the outer loss, where the original takes it (its running-statistics update included).
        clean_ref = None
        if reference is not None:
            with torch.no_grad():
                clean_ref = reference.detach().float()
        elif not (train_bn or ref_grad):
            with torch.no_grad():
                clean_ref = student(x)

        def inner(ws: list[torch.Tensor], _hs: list[torch.Tensor]) -> torch.Tensor:
            # The student in both roles: the inner problem depends on theta through both sides (through the
            # perturbed side only, with detach_clean).
            (d,) = ws
            clean = _logits(student, x, grad=not detach_clean)
            return -form.divergence(clean, student(form.apply(x, d))) + l2 * d.pow(2).sum()

        def outer(ws: list[torch.Tensor], _hs: list[torch.Tensor]) -> torch.Tensor:
            # The clean prediction is the reference: the student must move its perturbed outputs back to it
            # (invariance to its own trigger), not move its clean outputs towards the trigger's.
            (d,) = ws
            ref = clean_ref if clean_ref is not None else _logits(student, x, grad=ref_grad)
            # Mean over the whole batch: the unperturbed samples contribute 0, so hg_out_portion sets the weight
            # of the unlearning against the KD loss, as the portion of poisoned samples does in I-BAU.
            loss = form.divergence(ref, student(form.apply(x, sel * d)))
            seen.append(loss.detach())
            return loss

        w = delta.detach().clone().requires_grad_(True)
        grads = fixed_point_hypergrad([w], params, inner, outer, K=K, step=step)
        if train_bn:
            # The value that was differentiated: another train-mode forward would move the running statistics.
            out_val = float(seen[0])
        else:
            with torch.no_grad():
                out_val = float(outer([w], params))
    return grads, {"sr_outer": out_val, "sr_perturbed": float(k)}


def _kd_grad_norm(student: nn.Module, t: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor]) -> float:
    """Norm of the gradient of the plain KD loss ``KL(T(x) || S(x))`` of this batch (the student in its mode),
    ``t`` the teacher's logits ``T(x)``."""
    # The loop's own forward on this batch updates the BatchNorm statistics; this one must not do it twice.
    saved = [b.detach().clone() for b in student.buffers()]
    loss = _kl_rows(t, student(x).float()).mean()
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for b, v in zip(student.buffers(), saved, strict=True):
            b.copy_(v)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))


@DEFENSES.register("sr")
class SelfRetrospection(Defense):
    """Self-Retrospection, run as a second stage at the end of the budget.

    Hyperparameters (``defense.<key>``):
        inner_round: Adam steps of the perturbation search (paper: 10; sweeps 10/20).
        pert_lr: the search's Adam learning rate (paper: 0.1).
        pert_l2: the L2 penalty on the perturbation (paper: 0.001).
        pert_model: ``student`` (paper default) or ``teacher``: the model whose trigger is searched. The
            hypergradient's inner problem is always the student's.
        hg_out_portion: fraction of the batch that carries the perturbation in the outer loss, in (0, 1]
            (paper: 0.02).
        K: fixed-point iterations of the hypergradient (paper: 5).
        fp_step: the fixed-point map's inner gradient-descent step (paper: 0.1).
        sup_resume_lr: the student's fresh learning rate for the second stage, cosine over what remains.
            Default 1e-4 (paper: 5e-4, a tenfold jump over where the first stage's cosine has fallen on digits).
        hg_ref: the outer loss's reference: ``student`` (ALGORITHMS.md: ``KL(S(x) || S(x'))``) or ``teacher``
            (``KL(T(x) || S(x'))``, I-BAU's form with the teacher's outputs as labels). Default ``teacher``: with
            the student's own outputs the unperturbed 98% of the batch contribute nothing, and a student that
            ignores its input minimises the objective; the teacher's outputs anchor it with the KD loss.
        sr_max_ratio: the hypergradient is scaled down, when needed, to at most this multiple of the norm of the
            batch's KD gradient ``KL(T(x) || S(x))``; None leaves it as it is (the paper). Default 0.3: on
            synthetic inputs SR's perturbation flips most predictions without being the trigger, and the raw
            hypergradient made the second stage train on SR alone.
        sr_start: where the second stage starts, as a fraction of the step budget in [0, 1]. Default 0.9: the
            paper resumed from the last few hundred of 80,000 pseudo batches; on digits' 3,000 steps the last
            10% leaves the retrospection enough steps to act.
        pert_space: ``pixel_clamp`` (``clamp(x + delta, 0, 1)``: a trigger is an image edit) or ``normalized``
            (``x + delta * std``, no clamp: the original's space, where pert_lr 0.1 is 0.1 std). The student's
            std is used for every model. Applies to the search, both losses, the flip rate and the probes.
        pert_init: ``noise`` (std 1e-3: zero is a stationary point of the search) or ``zero`` (the original,
            which leaves zero only through rounding-level gradients).
        search_l2: the L2 of the search alone; None uses pert_l2 (the original's CMI/OOD search has none, 0.0,
            while their inner loss keeps 0.001).
        sr_loss: the KL of the search and both losses: ``batchmean`` (summed over classes, mean over the batch),
            ``mean`` (mean over batch and classes: the original ZSKT) or ``batchmean_t2`` (batchmean at
            temperature sr_T times sr_T^2: the original CMI/OOD).
        sr_T: the temperature of those KLs (the original: ZSKT's KD temperature, CMI 20, OOD 8).
        sr_bn: ``eval`` (no SR forward moves BatchNorm statistics or depends on the batch) or ``train`` (the
            original: the hypergradient's inner and outer student forwards use batch statistics and update the
            running ones). The search stays in eval mode either way, as the sweeps' teacher search is.
        inner_detach_clean: the inner loss's clean side ``S(x)`` without gradient (the original), instead of a
            mixed derivative through both sides.
        hg_ref_grad: with ``hg_ref: student``, the outer loss's reference ``S(x)`` keeps its gradient (the
            original CMI/OOD; its ZSKT detaches it).
        hg_out_rounding: rows carrying the perturbation in the outer loss: ``round`` or ``floor`` (the original's
            ``int(n * portion)``), at least one either way.
        sr_clip: the student's gradient-norm clip in the second stage: ``synth`` (the synthesizer's ``clip``
            applies to SR + KD), None (no clip: the original's SR branch) or a number > 0.
        sr_fresh_opt: the second stage starts with a fresh optimiser of the student's kind (new moments) at
            sup_resume_lr, as the original's resume from a checkpoint; False keeps the first stage's moments.

    The measurements behind these defaults are in ``docs/defaults.md``.
    """

    defaults: dict[str, Any] = {
        "inner_round": 10,
        "pert_lr": 0.1,
        "pert_l2": 1e-3,
        "pert_model": "student",
        "hg_out_portion": 0.02,
        "K": 5,
        "fp_step": 0.1,
        "sup_resume_lr": 1e-4,
        "sr_start": 0.9,
        "hg_ref": "teacher",
        "sr_max_ratio": 0.3,
        "pert_space": "pixel_clamp",
        "pert_init": "noise",
        "search_l2": None,
        "sr_loss": "batchmean",
        "sr_T": 1.0,
        "sr_bn": "eval",
        "inner_detach_clean": False,
        "hg_ref_grad": False,
        "hg_out_rounding": "round",
        "sr_clip": "synth",
        "sr_fresh_opt": False,
    }

    def validate(self) -> None:
        p = self.params
        p["inner_round"] = as_int("inner_round", p["inner_round"], lo=1)
        p["pert_lr"] = as_float("pert_lr", p["pert_lr"], lo=0.0, lo_open=True)
        p["pert_l2"] = as_float("pert_l2", p["pert_l2"], lo=0.0)
        p["pert_model"] = as_choice("pert_model", p["pert_model"], ("student", "teacher"))
        p["hg_out_portion"] = as_float("hg_out_portion", p["hg_out_portion"], lo=0.0, hi=1.0, lo_open=True)
        p["K"] = as_int("K", p["K"], lo=1)
        p["fp_step"] = as_float("fp_step", p["fp_step"], lo=0.0, lo_open=True)
        p["sup_resume_lr"] = as_float("sup_resume_lr", p["sup_resume_lr"], lo=0.0, lo_open=True)
        p["sr_start"] = as_float("sr_start", p["sr_start"], lo=0.0, hi=1.0)
        p["hg_ref"] = as_choice("hg_ref", p["hg_ref"], ("student", "teacher"))
        if p["sr_max_ratio"] is not None:
            p["sr_max_ratio"] = as_float("sr_max_ratio", p["sr_max_ratio"], lo=0.0, lo_open=True)
        p["pert_space"] = as_choice("pert_space", p["pert_space"], ("pixel_clamp", "normalized"))
        p["pert_init"] = as_choice("pert_init", p["pert_init"], ("noise", "zero"))
        if p["search_l2"] is not None:
            p["search_l2"] = as_float("search_l2", p["search_l2"], lo=0.0)
        p["sr_loss"] = as_choice("sr_loss", p["sr_loss"], _SR_LOSSES)
        p["sr_T"] = as_float("sr_T", p["sr_T"], lo=0.0, lo_open=True)
        p["sr_bn"] = as_choice("sr_bn", p["sr_bn"], ("eval", "train"))
        for key in ("inner_detach_clean", "hg_ref_grad", "sr_fresh_opt"):
            p[key] = as_bool(key, p[key])
        if p["hg_ref_grad"] and p["hg_ref"] != "student":
            raise ValueError("defense.hg_ref_grad=true needs defense.hg_ref=student (the teacher's logits have no "
                             "gradient); set hg_ref: student or hg_ref_grad: false")
        p["hg_out_rounding"] = as_choice("hg_out_rounding", p["hg_out_rounding"], ("round", "floor"))
        clip = p["sr_clip"]
        if not (clip is None or clip == "synth"):
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
                raise ValueError(f"defense.sr_clip={clip!r} is not allowed; allowed: synth, null (no clip) or a "
                                 "number > 0")
            p["sr_clip"] = float(clip)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.start_step = 0
        self._rng = torch.Generator()
        self.sr_steps = 0
        self._last: dict[str, float] = {"sr_outer": 0.0, "sr_pert_norm": 0.0, "sr_flip": 0.0, "sr_hg_norm": 0.0,
                                        "sr_scale": 1.0}
        self.form = SRForm(None, self.params["sr_loss"], self.params["sr_T"])
        # The last SR step's batch and perturbation, for the probes (not checkpointed: every evaluation after a
        # resume follows a fresh SR step).
        self._last_x: torch.Tensor | None = None
        self._last_delta: torch.Tensor | None = None

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
        self.start_step = self.stage2_start(total_steps)
        self._rng.manual_seed(child_seed(generator))
        if self.params["pert_space"] == "normalized":
            std = getattr(student, "std", None)
            if not isinstance(std, torch.Tensor):
                raise ValueError("defense.pert_space=normalized needs a student that normalises its input (a "
                                 "Classifier with a std buffer); use pert_space: pixel_clamp")
            self.form = SRForm(std.detach().clone(), self.params["sr_loss"], self.params["sr_T"])

    def stage2_start(self, total_steps: int) -> int | None:
        return int(round(self.params["sr_start"] * total_steps))

    def stage2_lr(self) -> float | None:
        return self.params["sup_resume_lr"]

    def stage2_clip(self, clip: float | None) -> float | None:
        c = self.params["sr_clip"]
        return clip if c == "synth" else c

    def stage2_fresh_optimizer(self) -> bool:
        return self.params["sr_fresh_opt"]

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        if step < self.start_step:
            return
        p, form = self.params, self.form
        train_bn = p["sr_bn"] == "train"
        x = x.detach()
        # The student's eval-mode logits on x, computed once: the perturbation search's reference (when it searches
        # the student), the outer loss's (hg_ref student) and the flip rate's. Nothing moves the student's weights
        # before the loop steps, so they stay valid through this call.
        with torch.no_grad(), _InMode(student):
            s_clean = student(x)
        pert_model = student if p["pert_model"] == "student" else teacher
        search_l2 = p["pert_l2"] if p["search_l2"] is None else p["search_l2"]
        delta = find_perturbation(pert_model, x, p["inner_round"], p["pert_lr"], search_l2, self._rng,
                                  ref=s_clean if pert_model is student else None, form=form, init=p["pert_init"])
        t_logits = None  # the teacher's logits, computed once for the outer reference and the bound
        if p["hg_ref"] == "teacher" or p["sr_max_ratio"] is not None:
            with torch.no_grad():
                t_logits = teacher(x).float()
        if p["hg_ref"] == "teacher":
            reference = t_logits
        else:  # the student's own logits; in train mode or with their gradient, taken inside the outer loss
            reference = None if (train_bn or p["hg_ref_grad"]) else s_clean
        grads, stats = retrospection_hypergrad(
            student, x, delta, p["hg_out_portion"], p["pert_l2"], p["K"], p["fp_step"], self._rng, reference,
            form=form, rounding=p["hg_out_rounding"], train_bn=train_bn, detach_clean=p["inner_detach_clean"],
            ref_grad=p["hg_ref_grad"],
        )
        params = [q for q in student.parameters() if q.requires_grad]
        hg_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = 1.0
        if p["sr_max_ratio"] is not None:
            kd_norm = _kd_grad_norm(student, t_logits, x, params)
            limit = p["sr_max_ratio"] * kd_norm
            if float(hg_norm) > limit:
                scale = limit / float(hg_norm)
        with torch.no_grad():
            for q, g in zip(params, grads, strict=True):
                g = g * scale
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.add_(g)
            with _InMode(student):
                if train_bn:  # the running statistics moved since s_clean: both sides of the flip rate see the new
                    s_clean = student(x)
                flips = (student(form.apply(x, delta)).argmax(1) != s_clean.argmax(1)).float().mean()
        self.sr_steps += 1
        self._last = {**stats, "sr_pert_norm": float(delta.norm()), "sr_flip": 100.0 * float(flips),
                      "sr_hg_norm": float(hg_norm), "sr_scale": float(scale)}
        self._last_x, self._last_delta = x.clone(), delta  # a bank's batch may be overwritten in place

    def metrics(self) -> dict[str, float]:
        out = {"sr_steps": float(self.sr_steps)}
        out.update({k: v for k, v in self._last.items() if k != "sr_perturbed"})
        return out

    def probe(self, evaluation: Evaluation, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        """Whether the last perturbation is the trigger, once the second stage has taken an SR step.

        ``sr_flip0``: % of the last SR batch whose student prediction the form alone flips (delta = 0: the clamp's
        share of ``sr_flip``). Where the attack is known: ``sr_trigger_target_rate`` / ``sr_student_target_rate``,
        % of the clean originals of the triggered test set that the teacher / the student assigns to the target
        with the perturbation added; ``sr_trigger_cos``, the cosine between the perturbation and the mean trigger
        change ``mean(x_poison - x_poison_clean)``, both in pixel space. Eval mode, no gradient, no random draw.
        """
        delta, x, form = self._last_delta, self._last_x, self.form
        if delta is None or x is None:
            return {}
        with torch.no_grad(), _InMode(student):
            flips0 = (student(form.apply(x, torch.zeros_like(delta))).argmax(1) != student(x).argmax(1)).float()
            out = {"sr_flip0": 100.0 * float(flips0.mean())}
            xs, target = evaluation.x_poison_clean, evaluation.target
            if target is None or xs is None or len(xs) == 0:
                return out
            for key, model in (("sr_trigger_target_rate", teacher), ("sr_student_target_rate", student)):
                pred = torch.cat([predict(model, form.apply(xs[i : i + _PROBE_BATCH], delta), _PROBE_BATCH)
                                  for i in range(0, len(xs), _PROBE_BATCH)])
                out[key] = 100.0 * float((pred == target).float().mean())
            change = (evaluation.x_poison - xs).mean(0)
            cos = F.cosine_similarity(form.pixel(delta).flatten().double(), change.flatten().double(), dim=0)
            out["sr_trigger_cos"] = float(cos)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sr_steps": self.sr_steps, "rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sr_steps = int(state.get("sr_steps", 0))
        if "rng" in state:
            self._rng.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
