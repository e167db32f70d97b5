"""The pure pieces of a study's results: Pareto fronts (clean_acc maximised, asr minimised), hypervolume, the
grouping of seeds per configuration, and the recommended configuration. Plain Python, no torch, so that
``abd-ray status`` stays quick."""

from __future__ import annotations

import json
import math
from typing import Any

from abd_ray.stats import mean_std


def pareto_front(points: list[dict[str, Any]], acc: str = "clean_acc", asr: str = "asr") -> list[dict[str, Any]]:
    """The non-dominated points (higher ``acc``, lower ``asr``), sorted by ``asr`` then ``-acc``.

    A point is dominated when another is at least as good in both and better in one. NaN points are skipped.
    """
    pts = [p for p in points if finite(p.get(acc)) and finite(p.get(asr))]
    front = [p for p in pts if not any(dominates(q, p, acc, asr) for q in pts)]
    return sorted(front, key=lambda p: (p[asr], -p[acc]))


def dominates(q: dict[str, Any], p: dict[str, Any], acc: str = "clean_acc", asr: str = "asr") -> bool:
    """Whether ``q`` is at least as good as ``p`` in both objectives and better in one."""
    return q[acc] >= p[acc] and q[asr] <= p[asr] and (q[acc] > p[acc] or q[asr] < p[asr])


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``(clean_acc, asr)`` points, clean_acc maximised and asr minimised, reference point
    (0, 100): both in percent, so the largest possible value is 10,000."""
    pts = sorted(((a, 100.0 - s) for a, s in points if a == a and s == s and a > 0 and s < 100), reverse=True)
    hv, best_y = 0.0, 0.0
    for x, y in pts:  # x descending: each point adds the strip above the best y so far
        if y > best_y:
            hv += x * (y - best_y)
            best_y = y
    return hv


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def canonical(v: Any) -> Any:
    """A hyperparameter value in one form: 4 and 4.0 are the same value; YAML and Optuna may give either."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def by_config(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs of one cell grouped by configuration (defense and hyperparameters) across seeds: one row per
    configuration with the mean, sample std and count ``n`` of clean_acc / asr / robust_acc, its seeds and trials
    (``trial_id`` is the first of them)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if finite(r.get("clean_acc")) and finite(r.get("asr")):
            key = json.dumps([r["defense"], r.get("kind"), r.get("params", {})], sort_keys=True, default=str)
            groups.setdefault(key, []).append(r)
    out = []
    for grp in groups.values():
        agg = {**grp[0], "n": len(grp), "trial_ids": [r["trial_id"] for r in grp],
               "seeds": [r.get("seed") for r in grp]}
        for k in ("clean_acc", "asr", "robust_acc"):
            agg[k], agg[f"{k}_std"], _ = mean_std([r.get(k) for r in grp])
        out.append(agg)
    return out


def recommend(rows: list[dict[str, Any]], undefended_acc: float, max_acc_drop: float,
              defense: str | tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """The defended run (or configuration, for rows of :func:`by_config`) with the lowest asr whose clean_acc is
    within ``max_acc_drop`` of the undefended one.

    Ties go to the higher clean_acc. ``defense`` restricts the candidates to one defense (or to several: those a
    search with a switch runs).
    """
    allowed = (defense,) if isinstance(defense, str) else defense
    cands = [r for r in rows if r["defense"] != "none" and (allowed is None or r["defense"] in allowed)
             and finite(r.get("clean_acc")) and finite(r.get("asr"))
             and (not finite(undefended_acc) or r["clean_acc"] >= undefended_acc - max_acc_drop)]
    if not cands:
        return None
    return min(cands, key=lambda r: (r["asr"], -r["clean_acc"]))


def search_against_start(rows: list[dict[str, Any]], start: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a cell's search trials stand against its warm start: each one's origin, whether it is on the front of
    the cell's finished trials, and which trial dominates it; and a one-line verdict on the sampler's proposals.

    Args:
        rows: the cell's finished trials (any kind), each with ``trial_id``, ``kind``, ``defense``, ``params``
            (hyperparameters by name), ``clean_acc`` and ``asr``.
        start: the warm start's points in order, each as the resolved defense and hyperparameters of its trial
            (``{"defense": ..., "params": {...}}``); with the defaults included, they come first.
    """
    search = [r for r in rows if r.get("kind") == "search"]

    def origin(r: dict[str, Any]) -> str:
        for i, pt in enumerate(start):
            if r["defense"] == pt["defense"] and all(
                    canonical(r["params"].get(k)) == canonical(v) for k, v in pt["params"].items()):
                return "defaults" if i == 0 and pt.get("defaults") else "warm start"
        return "proposal"

    out = []
    for r in search:
        better = [q for q in rows if dominates(q, r)]
        # The dominating trial named is the strongest one: lowest asr, then highest clean_acc.
        by = min(better, key=lambda q: (q["asr"], -q["clean_acc"]))["trial_id"] if better else None
        out.append({"trial_id": r["trial_id"], "origin": origin(r), "defense": r["defense"],
                    "params": r["params"], "clean_acc": r["clean_acc"], "asr": r["asr"],
                    "on_front": not better, "dominated_by": by})
    proposals = [r for r in out if r["origin"] == "proposal"]
    on = [r["trial_id"] for r in proposals if r["on_front"]]
    if not proposals:
        verdict = "no proposal of the sampler has finished: the search so far is its warm start"
    elif on:
        verdict = f"{len(on)} of the sampler's {len(proposals)} proposals lie on the front ({', '.join(on)})"
    else:
        doms = sorted({r["dominated_by"] for r in proposals})
        names = {r["trial_id"]: r["origin"] for r in out}
        verdict = (f"every one of the sampler's {len(proposals)} proposals is dominated, by "
                   + ", ".join(f"{t} ({names.get(t, 'a fixed trial')})" for t in doms)
                   + ": the front is the warm start's and the fixed trials' points")
    return {"trials": out, "proposals_on_front": len(on), "proposals": len(proposals), "verdict": verdict}
