"""Benchmark: ABD's defenses (Hong et al., ICML 2023) on digits, against the undefended run of the same cell.

    python bench/defenses.py [--steps N] [--seed 0] [--only zskt] [--fresh] [--out FILE] [--merge FILE ...]

Cells: every registered defense with zskt for badnet_grid, blend and trojan_3x3; none / abd with every other
registered synthesizer on badnet_grid. Each run uses the package defaults (dataset budget, defense
hyperparameters). Prints one JSON line per run; writes bench/results/defenses.json (updated after every run, so an
interrupted benchmark resumes where it stopped unless --fresh) and bench/results/defenses.md (the table: clean_acc,
asr, robust_acc, der against the undefended twin, and wall time relative to it). Each run records the commit and
the defense's resolved hyperparameters; a run whose recorded hyperparameters differ from the package's current
defaults is stale and runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from run import git_commit  # noqa: E402  (bench/run.py)

ZSKT_ATTACKS = ("badnet_grid", "blend", "trojan_3x3")


def cells(only: str | None) -> list[tuple[str, str, str]]:
    """(synthesizer, attack, defense), undefended twin first in each group: zskt with every registered defense,
    every other registered synthesizer with none and abd."""
    from abd_ray.registry import DEFENSES, SYNTHESIZERS, load_all

    load_all()
    defenses = ["none", *(d for d in DEFENSES.names() if d != "none")]
    out = [("zskt", a, d) for a in ZSKT_ATTACKS for d in defenses]
    out += [(s, "badnet_grid", d) for s in SYNTHESIZERS.names() if s != "zskt" for d in ("none", "abd")]
    if only:
        out = [c for c in out if c[0] in only.split(",")]
    return out


def key(c: tuple[str, str, str], seed: int, steps: int | None) -> str:
    return f"{c[0]}/{c[1]}/{c[2]}/seed{seed}/steps{steps or 'default'}"


def defense_params(defense: str) -> dict:
    """The defense's resolved default hyperparameters, as a run records them (JSON-comparable)."""
    from abd_ray.defenses import build_defense

    return json.loads(json.dumps(build_defense(defense).params, default=str))


def stale(row: dict) -> bool:
    """Whether a recorded run was made with other defense settings than the current defaults (rows from before
    the settings were recorded are kept)."""
    return "defense_params" in row and row["defense_params"] != defense_params(row["defense"])


def run_cell(c: tuple[str, str, str], seed: int, steps: int | None, cache: str) -> dict:
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill

    synth, attack, defense = c
    flat = {"dataset": "digits", "synthesizer": synth, "defense": defense, "seed": seed, "cache_dir": cache,
            "attack.name": attack, "attack.target": 0, "device": "auto"}
    if steps is not None:
        flat["steps"] = steps
        flat["eval_every"] = steps
    t0 = time.perf_counter()
    res = distill(RunConfig.from_flat(flat), progress=False)
    m = res.metrics
    return {
        "synthesizer": synth, "attack": attack, "defense": defense, "seed": seed, "steps": steps,
        "clean_acc": m["clean_acc"], "asr": m["asr"], "robust_acc": m["robust_acc"],
        "teacher_clean_acc": m.get("teacher_clean_acc"), "teacher_asr": m.get("teacher_asr"),
        "wall_s": m["wall_s"], "process_s": round(time.perf_counter() - t0, 2),
        "defense_metrics": {k: v for k, v in m.items() if k.startswith(("sv_", "sr_"))},
        "defense_params": defense_params(defense), "commit": git_commit(),
    }


def table(rows: dict[str, dict]) -> str:
    from abd_ray.metrics import der

    lines = [
        "| synthesizer | attack | defense | clean_acc | asr | robust_acc | der | wall_s | time vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_cell = {(r["synthesizer"], r["attack"], r["defense"], r["seed"], r["steps"]): r for r in rows.values()}
    for (s, a, d, seed, steps), r in by_cell.items():
        base = by_cell.get((s, a, "none", seed, steps))
        if base is not None and d != "none":
            dr = f"{der(base['clean_acc'], base['asr'], r['clean_acc'], r['asr']):.3f}"
            rel = f"{r['wall_s'] / base['wall_s']:.2f}x"
        else:
            dr, rel = "-", ("1.00x" if d == "none" else "-")
        lines.append(f"| {s} | {a} | {d} | {r['clean_acc']:.1f} | {r['asr']:.1f} | {r['robust_acc']:.1f} | {dr} | "
                     f"{r['wall_s']:.0f} | {rel} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the digits budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated synthesizers to run (default: all cells)")
    p.add_argument("--cache", default=os.environ.get("ABD_RAY_CACHE", ".abd_ray/cache"))
    p.add_argument("--fresh", action="store_true", help="ignore results already in defenses.json")
    p.add_argument("--out", default=None, help="results file (default bench/results/defenses.json); a second process "
                   "with other --only cells can write its own, merged later with --merge")
    p.add_argument("--merge", nargs="*", default=[], help="results files whose runs are added to --out, then exit")
    p.add_argument("--smoke-test", action="store_true", help="two cells, 20 steps: checks that the script runs")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.steps, todo = 20, [("zskt", "badnet_grid", "none"), ("zskt", "badnet_grid", "abd")]
    else:
        todo = cells(args.only)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out) if args.out else RESULTS / ("defenses_smoke.json" if args.smoke_test else "defenses.json")
    doc = {"runs": {}}
    if out_json.exists() and not args.fresh:
        doc = json.loads(out_json.read_text())
    if args.merge:
        for other in args.merge:
            doc["runs"].update(json.loads(Path(other).read_text())["runs"])
        out_json.write_text(json.dumps(doc, indent=2, sort_keys=True))
        out_json.with_suffix(".md").write_text(table(doc["runs"]))
        print(table(doc["runs"]))
        return 0
    doc["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    doc["command"] = " ".join([Path(sys.executable).name, "bench/defenses.py", *(argv or sys.argv[1:])])
    for c in todo:
        k = key(c, args.seed, args.steps)
        if k in doc["runs"] and not stale(doc["runs"][k]):
            continue
        row = run_cell(c, args.seed, args.steps, args.cache)
        print(json.dumps(row, sort_keys=True), flush=True)
        doc["runs"][k] = row
        out_json.write_text(json.dumps(doc, indent=2, sort_keys=True))
        (out_json.with_suffix(".md")).write_text(table(doc["runs"]))
    print(table(doc["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
