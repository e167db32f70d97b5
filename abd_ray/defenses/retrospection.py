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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.defenses._params import as_choice, as_float, as_int
from abd_ray.defenses.base import Defense, child_seed
from abd_ray.defenses.hypergrad import fixed_point_hypergrad
from abd_ray.losses import kl_rows
from abd_ray.registry import DEFENSES

# delta "starts at zero"; but zero is an exact minimum of the divergence, where its gradient vanishes and Adam
# would never move. A start this small is zero for every practical purpose and breaks the symmetry; Adam's
# scale-free steps then move it by about pert_lr from the first step.
_DELTA_INIT_STD = 1e-3


def _apply(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` kept in the valid pixel range [0, 1]: a candidate trigger must be an image edit, so the search
    cannot win by pushing inputs far outside the data's range (on 8x8 digits an unbounded universal perturbation
    grows to the size of an image and stops resembling any trigger)."""
    return (x + delta).clamp(0.0, 1.0)


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p) || softmax(q))``."""
    return kl_rows(F.log_softmax(p_logits, dim=1), q_logits=q_logits)


class _EvalNoStats:
    """Run a model in eval mode inside the block and restore its mode afterwards.

    SR's perturbed forwards must neither move BatchNorm running statistics (they would carry the candidate trigger
    into test-time behaviour) nor depend on which other samples share the batch (a universal perturbation added to
    a whole batch is partly absorbed by batch statistics); eval mode gives both.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def find_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    inner_round: int = 10,
    lr: float = 0.1,
    l2: float = 1e-3,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """A universal perturbation that makes ``model`` change its mind on ``x``.

    Maximises ``KL(p(x) || p(x + delta)) - l2 * ||delta||^2`` over one image-shaped ``delta`` by Adam.

    Args:
        model: the model whose predictions are to be flipped (``p``); only ``delta`` receives gradients.
        x: a batch (N, C, H, W).
        inner_round: Adam steps.
        lr: Adam learning rate.
        l2: L2 penalty weight.
        generator: seeds the tiny symmetry-breaking start.
        ref: ``model``'s eval-mode logits on ``x``, when the caller has them (computed here otherwise).

    Returns:
        ``delta`` of shape (1, C, H, W), detached.
    """
    with _EvalNoStats(model):
        if ref is None:
            with torch.no_grad():
                ref = model(x)
        noise = torch.randn((1, *x.shape[1:]), generator=generator, dtype=x.dtype)
        delta = (noise * _DELTA_INIT_STD).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(inner_round):
            loss = -_kl_rows(ref, model(_apply(x, delta))).mean() + l2 * delta.pow(2).sum()
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

    Returns:
        One gradient per trainable parameter, and statistics (the outer loss, how many samples were perturbed).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    n = x.shape[0]
    k = max(1, min(n, int(round(portion * n))))
    idx = torch.randperm(n, generator=generator)[:k].to(x.device)
    sel = torch.zeros(n, 1, 1, 1, dtype=x.dtype, device=x.device)
    sel[idx] = 1.0

    with _EvalNoStats(student):
        with torch.no_grad():
            clean_ref = student(x) if reference is None else reference.detach().float()

        def inner(ws: list[torch.Tensor], _hs: list[torch.Tensor]) -> torch.Tensor:
            # The student in both roles: the inner problem depends on theta through both sides.
            (d,) = ws
            return -_kl_rows(student(x), student(_apply(x, d))).mean() + l2 * d.pow(2).sum()

        def outer(ws: list[torch.Tensor], _hs: list[torch.Tensor]) -> torch.Tensor:
            # The clean prediction is the fixed reference: the student must move its perturbed outputs back to
            # it (invariance to its own trigger), not move its clean outputs towards the trigger's.
            (d,) = ws
            # Mean over the whole batch: the unperturbed samples contribute 0, so hg_out_portion sets the weight
            # of the unlearning against the KD loss, as the portion of poisoned samples does in I-BAU.
            return _kl_rows(clean_ref, student(_apply(x, sel * d))).mean()

        w = delta.detach().clone().requires_grad_(True)
        grads = fixed_point_hypergrad([w], params, inner, outer, K=K, step=step)
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

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.start_step = 0
        self._rng = torch.Generator()
        self.sr_steps = 0
        self._last: dict[str, float] = {"sr_outer": 0.0, "sr_pert_norm": 0.0, "sr_flip": 0.0, "sr_hg_norm": 0.0,
                                        "sr_scale": 1.0}

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

    def stage2_start(self, total_steps: int) -> int | None:
        return int(round(self.params["sr_start"] * total_steps))

    def stage2_lr(self) -> float | None:
        return self.params["sup_resume_lr"]

    def add_student_grads(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, step: int) -> None:
        if step < self.start_step:
            return
        p = self.params
        x = x.detach()
        # The student's eval-mode logits on x, computed once: the perturbation search's reference (when it searches
        # the student), the outer loss's (hg_ref student) and the flip rate's. Nothing moves the student's weights
        # before the loop steps, so they stay valid through this call.
        with torch.no_grad(), _EvalNoStats(student):
            s_clean = student(x)
        pert_model = student if p["pert_model"] == "student" else teacher
        delta = find_perturbation(pert_model, x, p["inner_round"], p["pert_lr"], p["pert_l2"], self._rng,
                                  ref=s_clean if pert_model is student else None)
        t_logits = None  # the teacher's logits, computed once for the outer reference and the bound
        if p["hg_ref"] == "teacher" or p["sr_max_ratio"] is not None:
            with torch.no_grad():
                t_logits = teacher(x).float()
        reference = t_logits if p["hg_ref"] == "teacher" else s_clean
        grads, stats = retrospection_hypergrad(
            student, x, delta, p["hg_out_portion"], p["pert_l2"], p["K"], p["fp_step"], self._rng, reference
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
            with _EvalNoStats(student):
                flips = (student(_apply(x, delta)).argmax(1) != s_clean.argmax(1)).float().mean()
        self.sr_steps += 1
        self._last = {**stats, "sr_pert_norm": float(delta.norm()), "sr_flip": 100.0 * float(flips),
                      "sr_hg_norm": float(hg_norm), "sr_scale": float(scale)}

    def metrics(self) -> dict[str, float]:
        out = {"sr_steps": float(self.sr_steps)}
        out.update({k: v for k, v in self._last.items() if k != "sr_perturbed"})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sr_steps": self.sr_steps, "rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sr_steps = int(state.get("sr_steps", 0))
        if "rng" in state:
            self._rng.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
