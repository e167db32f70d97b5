"""The Shuffling Vaccine's loss math, as pure functions (ALGORITHMS.md section 4.1): the suspicion mask, the
divergence, the generator's term and the student's reweighted loss on fixed or banked data."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from abd_ray.losses import kl_rows


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
