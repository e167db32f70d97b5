"""Summaries over seeds: mean, standard deviation and count, and their one-line form (pure Python, no torch, so
that ``abd-ray status`` and the report stay quick to import)."""

from __future__ import annotations

import math
import statistics


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count of the finite ``values``."""
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
