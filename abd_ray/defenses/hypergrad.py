"""Implicit hypergradients of a bilevel problem by the fixed-point method.

Self-Retrospection (Hong et al., "Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023)
solves, like I-BAU (Zeng et al., ICLR 2022), the bilevel problem

    min_lambda  L_out(w*(lambda), lambda)   s.t.   w*(lambda) = argmin_w L_in(w, lambda)

and needs the total derivative of the outer loss with respect to ``lambda`` through the inner solution. By the
implicit function theorem, at a stationary point of the inner problem,

    dL_out/dlambda = d_lambda L_out - (d_lambda d_w L_in) (d_w d_w L_in)^{-1} d_w L_out.

The fixed-point method (Grazzi et al., ICML 2020) writes the inner optimum as a fixed point of one gradient-descent
step ``Phi(w, lambda) = w - step * d_w L_in(w, lambda)`` and approximates the inverse-Hessian-vector product by
``K`` iterations of ``v <- (d_w Phi)^T v + d_w L_out`` (a truncated Neumann series), using only Hessian-vector
products by double back-propagation; the hypergradient is then ``d_lambda L_out + (d_lambda Phi)^T v``.

The function below is generic: any inner loss, outer loss, inner parameters and hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LossFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]


def _grads(
    out: torch.Tensor | Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` that returns zeros (not None) for inputs the output does not depend on."""
    gs = torch.autograd.grad(
        out, list(inputs), grad_outputs=grad_outputs, create_graph=create_graph, retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, gs, strict=True)]


def fixed_point_hypergrad(
    params: Sequence[torch.Tensor],
    hparams: Sequence[torch.Tensor],
    inner_loss: LossFn,
    outer_loss: LossFn,
    K: int = 5,
    step: float = 0.1,
) -> list[torch.Tensor]:
    """Hypergradient of ``outer_loss`` with respect to ``hparams`` through the inner optimum ``params``.

    Args:
        params: the (approximate) inner solution ``w*``; tensors that require grad.
        hparams: the hyperparameters ``lambda``; tensors that require grad (e.g. a student's parameters).
        inner_loss: ``inner_loss(params, hparams)``, minimised over ``params``.
        outer_loss: ``outer_loss(params, hparams)``, whose total derivative in ``hparams`` is wanted.
        K: fixed-point iterations (1 or more); more approximate the inverse Hessian better when the inner
            problem is well conditioned.
        step: step size of the inner gradient-descent map ``Phi``; the iteration converges when
            ``step * H`` has spectral radius below 2 (``H`` the inner Hessian).

    Returns:
        One tensor per hyperparameter: the direct gradient plus the implicit term. Nothing is written to
        ``.grad``; the caller decides where the result goes.
    """
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"fixed-point iterations K={K!r} must be an integer >= 1")
    if not step > 0:
        raise ValueError(f"fixed-point step={step!r} must be > 0")
    params = list(params)
    hparams = list(hparams)

    # The outer gradients, direct in both arguments.
    o_loss = outer_loss(params, hparams)
    g_out_w = _grads(o_loss, params, retain_graph=True)
    g_out_h = _grads(o_loss, hparams)

    # Phi(w, lambda) = w - step * d_w L_in(w, lambda), built once with a graph so that vector-Jacobian products
    # with respect to both w and lambda are double back-propagations through it.
    i_grads = _grads(inner_loss(params, hparams), params, create_graph=True)
    phi = [w - step * g for w, g in zip(params, i_grads, strict=True)]

    # v <- (d_w Phi)^T v + d_w L_out, from v = 0: K terms of the Neumann series of (I - d_w Phi)^{-T} d_w L_out.
    # The first iteration maps v = 0 to d_w L_out exactly, so it starts there and K - 1 products remain.
    v = list(g_out_w)
    for _ in range(K - 1):
        jv = _grads(phi, params, grad_outputs=v, retain_graph=True)
        v = [a + b for a, b in zip(jv, g_out_w, strict=True)]

    implicit = _grads(phi, hparams, grad_outputs=v)
    return [(d + i).detach() for d, i in zip(g_out_h, implicit, strict=True)]
