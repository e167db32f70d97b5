"""Benchmark: the default digits teacher, trained from an empty cache, then reused.

    python bench/teacher.py [--repeats 1]

Prints one JSON line per call and a summary; writes bench/results/teacher.json. The target: clean_acc >= 97,
asr >= 95, trained in under 60 s on two CPU cores; the second call is a cache hit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def call(cache: str) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "abd_ray.cli",
            "teacher",
            "--dataset",
            "digits",
            "--attack",
            "badnet_grid",
            "--cache",
            cache,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="fresh-cache trainings to time")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            fresh, hit = call(cache), call(cache)
            print(json.dumps({"fresh": fresh, "cached": hit}))
            runs.append({"fresh": fresh, "cached": hit})
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/teacher.py",
        "runs": runs,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "teacher.json").write_text(json.dumps(summary, indent=2))
    f = runs[-1]["fresh"]
    print(
        f"digits teacher: clean_acc {f['clean_acc']:.2f} asr {f['asr']:.2f} trained in {f['wall_s']} s "
        f"(process {f['process_wall_s']} s); cache hit: {runs[-1]['cached']['cached']} "
        f"in {runs[-1]['cached']['process_wall_s']} s"
    )


if __name__ == "__main__":
    main()
