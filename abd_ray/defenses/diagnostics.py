"""How well the vaccine's suspect model tells poisoned from clean test inputs: an evaluation on test data, never
part of a run (a defense sees no test data)."""

from __future__ import annotations

import torch
from torch import nn

from abd_ray.defenses.vaccine_math import suspect_divergence, suspect_mask


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
