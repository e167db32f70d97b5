"""The vaccine check's statistics: does a suspect model separate anything on the run's own synthesized data?

A suspect that separates backdoor-dominated inputs gives them a far smaller divergence than the rest, a heavy low
tail of the log-divergence; one that does not gives a unimodal, light-tailed spread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from abd_ray.losses import kl_rows

# How the vaccine check picks a permutation draw (ShufflingVaccine's ``check_rule``).
CHECK_RULES = ("tail", "agreement")


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
