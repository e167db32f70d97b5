"""Ray's overhead (``bench/run.py ray``): the quickstart trials as a study vs the same trials as plain calls.

1. A fresh teacher cache; the quickstart teacher is trained once into it (``abd-ray teacher``).
2. The study: a copy of ``studies/quickstart.yaml`` with a reduced budget, run by ``abd-ray study`` (Ray Tune +
   Optuna + MLflow, ``max_concurrent`` trials at once, 1 CPU each); wall time of the whole command.
3. The same trials (the configs the study ran, Optuna's proposals included) as plain ``distill()`` calls, one after
   another in one process; and the same calls split over ``max_concurrent`` processes at once.
Figures: study wall / (sum of plain trial times / concurrency) -- the target, <= 1.15x -- and study wall /
the wall of the concurrent plain run (the same work on the same cores at the same time of day); teachers trained
(counted from the cache and the study's record): none may be trained twice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def plain_main(args: argparse.Namespace, argv: list[str]) -> None:
    """Run the configs of a JSON file as plain distill() calls, one after another; print one JSON line each."""
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill
    from abd_ray.engine.teacher import load_artifact

    for flat in json.loads(Path(args.configs).read_text()):
        t0 = time.perf_counter()
        cfg = RunConfig.from_flat(flat)
        teacher = load_artifact(cfg.teacher_file) if cfg.teacher_file else None
        res = distill(cfg, teacher=teacher, progress=False)
        print("PLAIN " + json.dumps({"wall_s": time.perf_counter() - t0, "engine_wall_s": res.metrics["wall_s"],
                                     "clean_acc": res.metrics["clean_acc"], "asr": res.metrics["asr"]}), flush=True)


def _plain(configs: list[dict], work: Path, tag: str) -> subprocess.Popen:
    f = work / f"plain-{tag}.json"
    f.write_text(json.dumps(configs))
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("run.py")), "_plain", "--configs", str(f)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _collect(p: subprocess.Popen) -> list[dict]:
    out, _ = p.communicate()
    return [json.loads(ln[6:]) for ln in out.splitlines() if ln.startswith("PLAIN ")]


def ray_main(args: argparse.Namespace, argv: list[str]) -> None:
    import run as R

    from abd_ray.study.folder import experiment_path, read_state
    from abd_ray.study.tuner import tune_trials

    work = Path(tempfile.mkdtemp(prefix="abd-bench-ray-"))
    cache = work / "cache"
    steps = 20 if args.smoke else args.steps
    src = (R.ROOT / "studies" / "quickstart.yaml").read_text()
    name = f"bench-ray-{int(time.time())}"
    txt = re.sub(r"^name: .*$", f"name: {name}", src, flags=re.M)
    txt = re.sub(r"^budget: .*$", f"budget: {{steps: {steps}, eval_every: {max(1, steps // 2)}, batch_size: 64}}",
                 txt, flags=re.M)
    if args.smoke:
        txt = re.sub(r"num_samples: \d+", "num_samples: 1", txt)
    spec_file = work / "study.yaml"
    spec_file.write_text(txt)
    conc = int(re.search(r"^max_concurrent: (\d+)", txt, flags=re.M).group(1))
    abd = [sys.executable, "-m", "abd_ray.cli"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}

    # 1. the teacher, trained once
    t0 = time.perf_counter()
    tj = subprocess.run([*abd, "teacher", "--dataset", "digits", "--attack", "badnet_grid", "--cache", str(cache),
                         "--json"], capture_output=True, text=True, check=True, env=env)
    teacher = json.loads(tj.stdout.strip().splitlines()[-1])
    teacher_s = time.perf_counter() - t0

    # 2. the study
    l0, t0 = R.load(), time.perf_counter()
    sp = subprocess.run([*abd, "study", str(spec_file), "--storage", str(work / "studies"), "--tracking-uri",
                         f"sqlite:///{work}/mlflow.db", "--cache", str(cache)], capture_output=True, text=True,
                        env=env)
    study_wall, l1 = time.perf_counter() - t0, R.load()
    study_dir = work / "studies" / name
    state = read_state(study_dir)
    trials = tune_trials(experiment_path(state))
    configs = [{k: v for k, v in t["config"].items() if not k.startswith("study.")} for t in trials]
    trial_engine = [float(t["last_result"].get("wall_s", "nan")) for t in trials]
    teachers_in_study = {a: bool(i.get("cached")) for a, i in state.get("teachers", {}).items()}

    # 3. plain calls: sequential, then the same split over `conc` processes at once
    l2, t0 = R.load(), time.perf_counter()
    seq = _collect(_plain(configs, work, "seq"))
    seq_wall = time.perf_counter() - t0
    order = sorted(range(len(configs)), key=lambda i: -trial_engine[i] if trial_engine[i] == trial_engine[i] else 0)
    parts: list[list[int]] = [[] for _ in range(conc)]
    loads = [0.0] * conc
    for i in order:  # longest first onto the least-loaded process
        j = loads.index(min(loads))
        parts[j].append(i)
        loads[j] += seq[i]["wall_s"] if i < len(seq) else 1.0
    l3, t0 = R.load(), time.perf_counter()
    procs = [_plain([configs[i] for i in p], work, f"par{j}") for j, p in enumerate(parts) if p]
    par = [r for p in procs for r in _collect(p)]
    par_wall, l4 = time.perf_counter() - t0, R.load()

    teacher_dirs = [p for p in (cache / "teachers").iterdir() if p.is_dir()] if (cache / "teachers").exists() else []
    sum_seq = sum(r["wall_s"] for r in seq)
    doc = {
        "machine": R.machine(), "command": R.cmdline(argv), "steps": steps, "concurrency": conc,
        "trials": len(configs), "study_ok": sp.returncode == 0, "study_wall_s": study_wall,
        "study_trial_engine_wall_s": trial_engine, "plain_seq": seq, "plain_seq_wall_s": seq_wall,
        "plain_seq_sum_s": sum_seq, "plain_par": par, "plain_par_wall_s": par_wall,
        "ratio_vs_seq_over_conc": study_wall / (sum_seq / conc) if sum_seq else None,
        "ratio_vs_parallel_plain": study_wall / par_wall if par_wall else None,
        "loads": {"study": [l0, l1], "seq": [l2, l3], "par": [l3, l4]},
        "teacher": {"trained_before_study_s": teacher_s, "cached_first_call": teacher.get("cached"),
                    "study_teachers_cached": teachers_in_study, "teacher_dirs_in_cache": len(teacher_dirs)},
        "study_tail": sp.stdout[-2000:] if sp.returncode else "",
    }
    shutil.rmtree(work, ignore_errors=True)
    trained = int(not teacher.get("cached")) + sum(not c for c in teachers_in_study.values())
    doc["teachers_trained"] = trained
    R.write_json("ray", doc, args.smoke)
    md = "\n".join([
        "## Ray's overhead: quickstart as a study vs plain calls", "",
        f"Command: `{doc['command']}`  ", f"Machine: {R.machine_line(doc['machine'])}", "",
        f"`studies/quickstart.yaml` with budget {steps} steps (eval every {max(1, steps // 2)}): {len(configs)} "
        f"trials (1 undefended + the ABD search), {conc} at a time, 1 CPU each, run by `abd-ray study` (Ray start, "
        "teacher stage, Tune + Optuna + MLflow, report) vs the same configs as plain `distill()` calls in fresh "
        "processes.", "",
        "| what | wall s | load (1 min) |", "|---|---|---|",
        f"| study (whole `abd-ray study` command) | {study_wall:.1f} | {l0} -> {l1} |",
        f"| plain calls one after another (sum) | {sum_seq:.1f} | {l2} -> {l3} |",
        f"| plain calls, {conc} processes at once | {par_wall:.1f} | {l3} -> {l4} |", "",
        f"- study / (sum of plain trial times / {conc}) = **{doc['ratio_vs_seq_over_conc']:.2f}x** (target <= 1.15x)",
        f"- study / plain calls run {conc} at once = **{doc['ratio_vs_parallel_plain']:.2f}x**",
        f"- teachers trained: {trained} (one before the study; the study's teacher stage found it cached: "
        f"{teachers_in_study}; plain calls load the study's teacher file); teacher folders in the cache: "
        f"{len(teacher_dirs)}", ""])
    print(md)
    if not args.smoke:
        R.update_section("ray", md)


def register(sub) -> dict[str, Any]:
    p = sub.add_parser("ray", help="Ray's overhead: quickstart as a study vs plain calls")
    p.add_argument("--steps", type=int, default=200)
    q = sub.add_parser("_plain")
    q.add_argument("--configs", required=True)
    return {"ray": ray_main, "_plain": plain_main}
