"""Exact fingerprint of short distillations, to prove that a change keeps every result bit for bit.

    python bench/fingerprint.py OUT.json [--cache DIR] [--steps 10]   # every synthesizer x every defense
    python bench/fingerprint.py --compare BEFORE.json AFTER.json       # prints IDENTICAL or the differing runs

Each run (digits, badnet_grid, seed 1, batch 32) records its final metrics and history as ``repr`` (every
digit), the sha256 of the student's weights and of the last samples; timings are left out. Take one before a
change meant to keep results (a refactor, a speed-up on the CPU, a new option off by default) and one after: any
difference names the run. A metric that only AFTER reports (a new diagnostic) is listed, not counted as a
difference: every value BEFORE had must still be there, unchanged.
About a minute on one core with the teacher cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

TIMINGS = {"wall_s", "cpu_s", "total_wall_s", "step_time_s"}


def fingerprint(cache: str, steps: int) -> dict[str, dict]:
    """The fingerprint of every registered synthesizer x defense."""
    from abd_ray.attacks import AttackSpec
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill
    from abd_ray.registry import DEFENSES, SYNTHESIZERS, load_all

    load_all()
    out = {}
    for synth in SYNTHESIZERS.names():
        for defense in DEFENSES.names():
            cfg = RunConfig(dataset="digits", attack=AttackSpec(name="badnet_grid"), synthesizer=synth,
                            defense=defense, steps=steps, eval_every=max(1, steps // 2), batch_size=32,
                            cache_dir=cache, seed=1)
            r = distill(cfg, progress=False)
            weights = hashlib.sha256()
            for k, v in sorted(r.student.state_dict().items()):
                weights.update(k.encode())
                weights.update(v.detach().cpu().contiguous().numpy().tobytes())

            def exact(d: dict) -> dict:
                return {k: repr(v) for k, v in sorted(d.items()) if k not in TIMINGS}

            out[f"{synth}/{defense}"] = {
                "metrics": exact(r.metrics),
                "history": [exact(e) for e in r.history],
                "student_sha256": weights.hexdigest(),
                "samples_sha256": hashlib.sha256(r.samples.numpy().tobytes()).hexdigest(),
            }
            print(f"{synth}/{defense}: {weights.hexdigest()[:16]}", flush=True)
    return out


def _without(run: dict, metrics: list[str]) -> dict:
    """A fingerprint entry without the given metric names."""
    def drop(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in metrics}

    return {**run, "metrics": drop(run["metrics"]), "history": [drop(e) for e in run["history"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="where to write the fingerprint (JSON)")
    p.add_argument("--cache", default=".abd_ray/fingerprint_cache", help="teacher cache (trained once if empty)")
    p.add_argument("--steps", type=int, default=10, help="distillation steps per run (default 10)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprints")
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(open(f).read()) for f in args.compare)
        added = sorted({m for run in after.values() for e in [run["metrics"], *run["history"]] for m in e}
                       - {m for run in before.values() for e in [run["metrics"], *run["history"]] for m in e})
        after = {k: _without(run, added) for k, run in after.items()}
        differing = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print("IDENTICAL" if not differing else "DIFFERENT: " + ", ".join(differing))
        if added:
            print("new metrics (not compared): " + ", ".join(added))
        return 1 if differing else 0
    if not args.out:
        p.error("give OUT.json, or --compare BEFORE AFTER")
    with open(args.out, "w") as f:
        json.dump(fingerprint(args.cache, args.steps), f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
