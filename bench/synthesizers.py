"""Backdoor transfer by synthesizer on digits: every registered synthesizer x {badnet_grid, blend, trojan_3x3}.

For each cell, one distillation with the digits defaults (``abd_ray.engine.distill.distill``, no defense, seed 0),
recording the student's clean_acc / asr / robust_acc, the teacher's, and the wall time. Results go to
``bench/results/synthesizers.json`` (rewritten after every cell, so a long run can be watched and resumed with
``--resume``) and a markdown table ``bench/results/synthesizers.md``.

    nohup .venv/bin/python bench/synthesizers.py > bench/results/synthesizers.log 2>&1 &
    .venv/bin/python bench/synthesizers.py --smoke-test      # 3 steps per cell, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from abd_ray.attacks import AttackSpec  # noqa: E402
from abd_ray.config import RunConfig  # noqa: E402
from abd_ray.engine.distill import distill  # noqa: E402
from abd_ray.registry import SYNTHESIZERS, load_all  # noqa: E402

HERE = Path(__file__).resolve().parent
ATTACKS = ["badnet_grid", "blend", "trojan_3x3"]


def table(rows: list[dict]) -> str:
    lines = [
        "| synthesizer | attack | teacher acc / asr | student clean_acc | student asr | robust_acc | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['synthesizer']} | {r['attack']} | {r['teacher_clean_acc']:.1f} / {r['teacher_asr']:.1f} | "
            f"{r['clean_acc']:.1f} | {r['asr']:.1f} | {r['robust_acc']:.1f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    load_all()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthesizers", nargs="*", default=SYNTHESIZERS.names())
    ap.add_argument("--attacks", nargs="*", default=ATTACKS)
    ap.add_argument("--steps", type=int, default=None, help="override the digits default step count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.environ.get("ABD_RAY_CACHE", ".abd_ray/cache"))
    ap.add_argument("--out", default=str(HERE / "results" / "synthesizers.json"))
    ap.add_argument("--resume", action="store_true", help="skip the cells already in --out")
    ap.add_argument("--smoke-test", action="store_true", help="3 steps per cell; writes nothing")
    args = ap.parse_args()
    steps = 3 if args.smoke_test else args.steps

    out = Path(args.out)
    rows: list[dict] = []
    if args.resume and out.exists():
        rows = json.loads(out.read_text())["rows"]
    done = {(r["synthesizer"], r["attack"]) for r in rows}
    meta = {
        "command": "python bench/synthesizers.py" + (f" --steps {args.steps}" if args.steps else ""),
        "dataset": "digits",
        "defense": "none",
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }
    # attack-major, so that a partial run already compares every synthesizer on the first attack
    for attack in args.attacks:
        for synth in args.synthesizers:
            if (synth, attack) in done:
                continue
            cfg = RunConfig(
                dataset="digits",
                attack=AttackSpec(attack, 0),
                synthesizer=synth,
                steps=steps,
                eval_every=steps,
                seed=args.seed,
                cache_dir=args.cache,
                device="cpu",
            )
            t0 = time.perf_counter()
            res = distill(cfg, progress=False)
            m = res.metrics
            row = {
                "synthesizer": synth,
                "attack": attack,
                "steps": cfg.resolved().steps,
                **{
                    k: round(float(m[k]), 2)
                    for k in ("clean_acc", "asr", "robust_acc", "teacher_clean_acc", "teacher_asr", "wall_s", "cpu_s")
                },
                "total_s": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not args.smoke_test:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
                out.with_suffix(".md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
