"""Evaluation metrics of ALGORITHMS.md section 2, as pure functions.

All percentages are in [0, 100]; ``der`` is in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 predictions of ``model`` on ``x``, batched, on the model's device; returned on CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(x[i : i + batch_size].to(device, non_blocking=True)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _percent(hits: torch.Tensor) -> float:
    if hits.numel() == 0:
        return float("nan")
    return 100.0 * int(hits.sum()) / hits.numel()


def clean_acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (%) on the clean test set."""
    return _percent(pred.cpu() == y.cpu())


def asr(pred_poisoned: torch.Tensor, target: int) -> float:
    """Attack success rate (%): fraction of the poisoned (non-target) test set predicted as ``target``."""
    return _percent(pred_poisoned.cpu() == target)


def robust_acc(pred_poisoned: torch.Tensor, y_true: torch.Tensor) -> float:
    """Robust accuracy (%): fraction of the poisoned test set predicted as its true label."""
    return _percent(pred_poisoned.cpu() == y_true.cpu())


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating (BackdoorBench) of a defended run against its undefended twin.

    Inputs in percent; the result is in [0, 1].
    """
    gain = max(0.0, asr_before - asr_after) / 100.0
    loss = max(0.0, acc_before - acc_after) / 100.0
    return (gain - loss + 1.0) / 2.0


def evaluate(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    x_poison: torch.Tensor,
    y_poison: torch.Tensor,
    target: int | None,
    batch_size: int = 512,
) -> dict[str, float]:
    """clean_acc, asr and robust_acc of ``model``; asr/robust_acc are NaN when there is no attack."""
    out = {"clean_acc": clean_acc(predict(model, x_test, batch_size), y_test)}
    if target is None or len(x_poison) == 0:
        out["asr"] = float("nan")
        out["robust_acc"] = float("nan")
    else:
        p = predict(model, x_poison, batch_size)
        out["asr"] = asr(p, target)
        out["robust_acc"] = robust_acc(p, y_poison)
    return out


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count of the finite ``values``."""
    import statistics

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def format_ms(mean: float, std: float, n: int, digits: int = 1) -> str:
    """``mean +- std (n)``, e.g. ``93.1 +- 0.4 (5)``; ``93.1 (1)`` for one value (it has no spread); ``n/a`` when
    there is none."""
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ({n})" if n == 1 else f"{mean:.{digits}f} +- {std:.{digits}f} ({n})"


def format_mean_std(values, digits: int = 1) -> str:
    """:func:`format_ms` of the finite ``values``."""
    return format_ms(*mean_std(values), digits=digits)
