"""KD-loop cost per step (``bench/run.py cost``): every registered synthesizer x defense on digits, and a short
32x32x3 WRN-16-2 -> WRN-16-1 run; each cell a fresh process (``bench/run.py _cell``) running the real loop."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from run import HERE, PY, RESULTS, ROOT, cmdline, load, machine, machine_line, update_section, write_json

from abd_ray.data.fake import write_cifar10
from abd_ray.registry import DEFENSES as DEFENSE_REGISTRY
from abd_ray.registry import SYNTHESIZERS, load_all

load_all()
SYNTHS = SYNTHESIZERS.names()
DEFENSES = ["none", *(d for d in DEFENSE_REGISTRY.names() if d != "none")]  # the undefended cell first
# The paper resumed SR from the last few hundred of 80,000 pseudo batches (ALGORITHMS.md 4.2): we take 400.
PAPER_SR_FRACTION = 400 / 80000


def write_random_teacher(path: Path) -> Path:
    """A WRN-16-2 with random weights, as a safetensors file (cost does not depend on the weights)."""
    import torch
    from safetensors.torch import save_file

    from abd_ray.models import build_model

    torch.manual_seed(0)
    m = build_model("wrn16_2", num_classes=10, shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def wait_barrier(spec: str, timeout: float = 300.0) -> None:
    """Check in to a barrier ``DIR:N`` (a file per process in DIR) and wait until N processes have, so that
    processes started at once begin their timed work together whatever their start-up took."""
    folder, n = spec.rsplit(":", 1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{os.getpid()}").touch()
    end = time.monotonic() + timeout
    while len(list(Path(folder).iterdir())) < int(n):
        if time.monotonic() > end:
            raise SystemExit(f"barrier {spec}: only {len(list(Path(folder).iterdir()))} of {n} checked in")
        time.sleep(0.05)


def cell_main(args: argparse.Namespace) -> None:
    """Run one distillation with the real KD loop and print its per-window step costs as one JSON line."""
    import torch

    from abd_ray.config import RunConfig, parse_sets
    from abd_ray.engine.distill import distill

    torch.set_num_threads(args.threads)
    flat: dict[str, Any] = {"dataset": args.dataset, "synthesizer": args.synth, "defense": args.defense,
                            "steps": args.steps, "eval_every": args.eval_every, "seed": 0, "device": args.device,
                            "cache_dir": args.cache, "attack.name": "badnet_grid", "attack.target": 0}
    if args.batch:
        flat["batch_size"] = args.batch
    if args.data_root:
        flat["data_root"] = args.data_root
    if args.teacher_file:
        flat["teacher_file"] = args.teacher_file
    if args.defense in ("sr", "abd"):
        flat["defense.sr_start"] = args.sr_start
    flat.update(parse_sets(args.set or []))
    cfg = RunConfig.from_flat(flat)
    marks: list[tuple[int, float, float, float]] = []
    cuda = torch.cuda.is_available() and args.device != "cpu"

    def report(metrics: dict[str, float], step: int, get_state) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append((step, time.perf_counter(), time.process_time(), float(metrics.get("step_time_s", "nan"))))

    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    if args.barrier:
        wait_barrier(args.barrier)
    t0, c0 = time.perf_counter(), time.process_time()
    res = distill(cfg, report=report, progress=False)
    windows = []
    prev = (0, t0, c0, float("nan"))
    for m in marks:
        n = m[0] - prev[0]
        windows.append({"steps": n, "wall_s_per_step": (m[1] - prev[1]) / n, "cpu_s_per_step": (m[2] - prev[2]) / n,
                        "loop_wall_s_per_step": m[3]})
        prev = m
    use = windows[1:] if len(windows) > 1 else windows  # the first window carries the warm-up
    n = sum(w["steps"] for w in use)
    out = {
        "synth": args.synth, "defense": args.defense, "dataset": args.dataset, "steps": args.steps,
        "measured_steps": n,
        "cpu_s_per_step": sum(w["cpu_s_per_step"] * w["steps"] for w in use) / n,
        "wall_s_per_step": sum(w["wall_s_per_step"] * w["steps"] for w in use) / n,
        "loop_wall_s_per_step": sum(w["loop_wall_s_per_step"] * w["steps"] for w in use) / n,
        "windows": windows,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": torch.get_num_threads(), "load": load(),
        "sr_steps": res.metrics.get("sr_steps"),
    }
    print("CELL " + json.dumps(out), flush=True)


def run_cell(synth: str, defense: str, *, dataset: str, steps: int, eval_every: int, threads: int,
             cache: str, batch: int | None = None, data_root: str | None = None, teacher_file: str | None = None,
             sets: list[str] | None = None, device: str = "cpu", timeout: float = 1800) -> dict[str, Any]:
    cmd = [PY, str(HERE / "run.py"), "_cell", "--synth", synth, "--defense", defense, "--dataset", dataset,
           "--steps", str(steps), "--eval-every", str(eval_every), "--threads", str(threads), "--cache", cache,
           "--sr-start", "0", "--device", device]
    if batch:
        cmd += ["--batch", str(batch)]
    if data_root:
        cmd += ["--data-root", data_root]
    if teacher_file:
        cmd += ["--teacher-file", teacher_file]
    for s in sets or []:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CELL ")]
    if p.returncode != 0 or not lines:
        return {"synth": synth, "defense": defense, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(lines[-1][5:])
    out["process_s"] = round(time.perf_counter() - t0, 2)
    return out


def idle_rss(threads: int) -> float:
    """Peak RSS of a process that only imports the engine: the floor under every cell's figure."""
    code = ("import resource, abd_ray.engine.distill, abd_ray.synthesizers, abd_ray.defenses; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return float(p.stdout.strip().splitlines()[-1])


def schedule_ratios(cells: dict[tuple[str, str], dict], synth: str, fractions: dict[str, float]) -> dict[str, Any]:
    """Whole-trial cost of abd / sr against the undefended run, SR only in its second stage.

    Stage 1 of abd is SV alone (the ``sv`` cell), stage 2 is SV + SR (the ``abd`` cell, measured with SR from step
    0); stage 1 of sr is the undefended step. A trial with a fraction ``f`` of its steps in stage 2 costs
    ``(1 - f) * stage1 + f * stage2``.
    """
    try:
        c0 = cells[(synth, "none")]["cpu_s_per_step"]
        sv = cells[(synth, "sv")]["cpu_s_per_step"]
        sr2 = cells[(synth, "sr")]["cpu_s_per_step"]
        abd2 = cells[(synth, "abd")]["cpu_s_per_step"]
    except KeyError:
        return {}
    out: dict[str, Any] = {"sv_step_ratio": sv / c0, "sr_stage_step_ratio": sr2 / c0,
                           "abd_stage2_step_ratio": abd2 / c0}
    for name, f in fractions.items():
        out[f"abd_trial_ratio@{name}"] = ((1 - f) * sv + f * abd2) / c0
        out[f"sr_trial_ratio@{name}"] = ((1 - f) * c0 + f * sr2) / c0
    return out


def cost_main(args: argparse.Namespace, argv: list[str]) -> None:
    m = machine()
    cache = args.cache
    synths = args.synths.split(",") if args.synths else list(SYNTHS)
    threads = 1
    doc: dict[str, Any] = {"machine": m, "command": cmdline(argv), "threads": threads}
    fractions = {"paper (last 400 of 80k)": PAPER_SR_FRACTION, "default sr_start 0.9": 0.1,
                 "quickstart sr_start 0.85": 0.15}

    def grid(dataset: str, synths: list[str], steps: int, eval_every: int, **kw) -> dict[tuple[str, str], dict]:
        cells: dict[tuple[str, str], dict] = {}
        for rep in range(args.reps):
            for s in synths:
                order = DEFENSES if rep % 2 == 0 else DEFENSES[::-1]
                for d in order:
                    r = run_cell(s, d, dataset=dataset, steps=steps, eval_every=eval_every, threads=threads,
                                 cache=cache, **kw)
                    print(json.dumps({k: v for k, v in r.items() if k != "windows"}), flush=True)
                    if (s, d) in cells and "cpu_s_per_step" in r and "cpu_s_per_step" in cells[(s, d)]:
                        prev = cells[(s, d)]
                        prev.setdefault("reps", [prev["cpu_s_per_step"]]).append(r["cpu_s_per_step"])
                        prev["cpu_s_per_step"] = statistics.median(prev["reps"])
                    else:
                        cells[(s, d)] = r
        return cells

    if args.from_log:
        return cost_from_log(args, argv, doc, fractions)
    if not args.cifar_only:
        steps, ev = (6, 3) if args.smoke else (args.steps or 100, (args.steps or 100) // 2)
        cells = grid("digits", synths, steps, ev)
        doc["digits"] = {"steps": steps, "eval_every": ev, "cells": [v for v in cells.values()],
                         "idle_rss_mib": idle_rss(threads),
                         "ratios": {s: schedule_ratios(cells, s, fractions) for s in synths}}
    if args.cifar or args.cifar_only:
        tmp = Path(tempfile.mkdtemp(prefix="abd-bench-"))
        try:
            root = write_cifar10(tmp / "data", n_train_per_batch=40, n_test=64)
            tf = write_random_teacher(tmp / "teacher.safetensors")
            csynths = args.cifar_synths.split(",")
            batch = 8 if args.smoke else 128
            steps = 2 if args.smoke else args.cifar_steps
            cc: dict[tuple[str, str], dict] = {}
            for s in csynths:
                extra: list[str] = []
                if s == "deepinversion":
                    extra.append(f"synth.iters={args.cifar_round_iters}")
                if s == "cmi":
                    extra.append(f"synth.g_steps={args.cifar_round_iters}")
                if s in ("deepinversion", "cmi"):
                    extra.append(f"synth.round_every={steps}")
                cc.update(grid("cifar10", [s], steps, 1, batch=batch, data_root=str(root), teacher_file=str(tf),
                               sets=extra))
            doc["cifar"] = {"batch": batch, "steps": steps, "eval_every": 1, "cells": list(cc.values()),
                            "note": "fake CIFAR-10 folder (random pixels) and a random-weight WRN-16-2 teacher file; "
                                    "speed does not depend on either",
                            "ratios": {s: schedule_ratios(cc, s, fractions) for s in csynths}}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for part in ("digits", "cifar"):
        if part in doc:
            doc[part].update(command=doc["command"], machine=m)
    prev = RESULTS / ("cost_smoke.json" if args.smoke else "cost.json")
    if prev.exists():  # a run of one part (digits or 32x32) keeps the other part's figures, with their command
        old = json.loads(prev.read_text())
        for part in ("digits", "cifar"):
            if part not in doc and part in old:
                doc[part] = {"command": old.get("command"), "machine": old.get("machine"), **old[part]}
    p = write_json("cost", doc, args.smoke)
    print(f"wrote {p}")
    md = cost_markdown(doc)
    print(md)
    if not args.smoke:
        if "digits" in doc:
            update_section("cost", md.split("<!-- cifar -->")[0])
        if "cifar" in doc:
            update_section("cost_cifar", md.split("<!-- cifar -->")[1] if "<!-- cifar -->" in md else md)


def cost_from_log(args: argparse.Namespace, argv: list[str], doc: dict[str, Any], fractions: dict[str, float]) -> None:
    """Render the cells printed by a (possibly interrupted) ``cost`` run: one JSON line per cell in its log."""
    rows = [json.loads(ln) for ln in Path(args.from_log).read_text().splitlines() if ln.startswith('{"synth"')]
    doc["command"] = f"{cmdline(['cost', '--cifar'])} (cells rendered from its log by {cmdline(argv)})"
    for ds, key in (("digits", "digits"), ("cifar10", "cifar")):
        cells = {(r["synth"], r["defense"]): r for r in rows if r.get("dataset") == ds}
        if not cells:
            continue
        synths = list(dict.fromkeys(s for s, _ in cells))
        first = next(iter(cells.values()))
        doc[key] = {"steps": first["steps"], "eval_every": first["steps"] - first["measured_steps"],
                    "cells": list(cells.values()), "ratios": {s: schedule_ratios(cells, s, fractions) for s in synths}}
        if key == "digits":
            doc[key]["idle_rss_mib"] = idle_rss(1)
        else:
            doc[key].update(batch=128, note="fake CIFAR-10 folder (random pixels) and a random-weight WRN-16-2 "
                                            "teacher file; speed does not depend on either")
    write_json("cost", doc, False)
    md = cost_markdown(doc)
    print(md)
    if "digits" in doc:
        update_section("cost", md.split("<!-- cifar -->")[0])
    if "cifar" in doc:
        update_section("cost_cifar", md.split("<!-- cifar -->")[1])


def _cell_table(cells: list[dict], per_step_unit: str = "ms") -> list[str]:
    scale = 1000.0 if per_step_unit == "ms" else 1.0
    by = {(c["synth"], c["defense"]): c for c in cells}
    synths = list(dict.fromkeys(c["synth"] for c in cells))
    head = "| synthesizer | " + " | ".join(f"{d}{' (SR stage)' if d in ('sr', 'abd') else ''}" for d in DEFENSES) + \
        " |"
    lines = [head, "|---|" + "---|" * len(DEFENSES)]
    for s in synths:
        row = [s]
        for d in DEFENSES:
            c = by.get((s, d))
            if c is None:
                row.append("-")
            elif "error" in c:
                row.append(f"error: {c['error'][:60]}")
            else:
                cpu = c["cpu_s_per_step"]
                wall = c["wall_s_per_step"] * scale
                row.append(f"{1 / cpu:.2f}/s ({cpu * scale:.1f} {per_step_unit} CPU, wall {wall:.1f}; "
                           f"{c['maxrss_mib']:.0f} MiB; load {c['load']})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def cost_markdown(doc: dict[str, Any]) -> str:
    out = []
    if "digits" in doc:
        d = doc["digits"]
        out += ["## Cost per step: digits, every synthesizer x defense", "",
                f"Command: `{d.get('command', doc['command'])}`  ",
                f"Machine: {machine_line(d.get('machine', doc['machine']))}", "",
                f"Each cell: a fresh process running `distill()` (the real KD loop) for {d['steps']} steps on digits "
                f"(badnet_grid teacher, default synthesizer budgets), single-threaded; the figure is the second half "
                f"of the run ({d['steps'] - d['eval_every']} steps, after the warm-up; one evaluation included). "
                "One step = one synthesizer step (a pseudo batch of 1 generator + 5 student steps for zskt/dfad; one "
                "student batch for the others, bank rounds amortised). `sr` and `abd` are measured with SR from step 0 "
                "(`sr_start=0`): their second-stage cost. Steps/s from process CPU time (= wall on an idle core); "
                f"peak RSS of the cell's process (a process that only imports the engine peaks at "
                f"{d['idle_rss_mib']:.0f} MiB).", ""]
        out += _cell_table(d["cells"])
        out += ["", "Whole-trial cost against the undefended trial (CPU time; stage 1 = SV, stage 2 = SV + SR):", "",
                "| synthesizer | SV step | SR-stage step (sr) | SV+SR step (abd stage 2) | abd trial @ paper schedule "
                "(SR on last 400/80k) | abd trial @ sr_start 0.9 | abd trial @ sr_start 0.85 |",
                "|---|---|---|---|---|---|---|"]
        for s, r in d["ratios"].items():
            if r:
                out.append(f"| {s} | {r['sv_step_ratio']:.2f}x | {r['sr_stage_step_ratio']:.2f}x | "
                           f"{r['abd_stage2_step_ratio']:.2f}x | "
                           f"**{r['abd_trial_ratio@paper (last 400 of 80k)']:.2f}x** | "
                           f"{r['abd_trial_ratio@default sr_start 0.9']:.2f}x | "
                           f"{r['abd_trial_ratio@quickstart sr_start 0.85']:.2f}x |")
        out.append("")
    if "cifar" in doc:
        c = doc["cifar"]
        out += ["<!-- cifar -->", "## Cost per step: 32x32x3, WRN-16-2 -> WRN-16-1, batch "
                f"{c['batch']} (CPU, short run)", "",
                f"Command: `{c.get('command', doc['command'])}`  ",
                f"Machine: {machine_line(c.get('machine', doc['machine']))}", "",
                f"Each cell: a fresh process, `distill()` for {c['steps']} steps (evaluation after each; the first "
                f"step is the warm-up and is not counted), single-threaded. {c['note']}. One zskt step = a pseudo "
                "batch (1 generator step + 10 student steps, paper config). deepinversion/cmi: their synthesis "
                "round is shortened (see the JSON) and runs once per measured step, so their figure is an upper "
                "bound of a real run's amortised step.", ""]
        out += _cell_table(c["cells"], "s")
        out += ["", "| synthesizer | SV step | SR-stage step | SV+SR step | abd trial @ paper schedule | "
                "abd trial @ sr_start 0.9 |", "|---|---|---|---|---|---|"]
        for s, r in c["ratios"].items():
            if r:
                out.append(f"| {s} | {r['sv_step_ratio']:.2f}x | {r['sr_stage_step_ratio']:.2f}x | "
                           f"{r['abd_stage2_step_ratio']:.2f}x | "
                           f"**{r['abd_trial_ratio@paper (last 400 of 80k)']:.2f}x** | "
                           f"{r['abd_trial_ratio@default sr_start 0.9']:.2f}x |")
        out.append("")
        out.append("Target: abd whole trial <= 1.3x the undefended trial at the paper's schedule.")
    return "\n".join(out)


def register(sub) -> dict[str, Any]:
    c = sub.add_parser("cost", help="KD-loop cost per step, synthesizer x defense")
    c.add_argument("--synths", default=None, help="comma-separated (default: all)")
    c.add_argument("--steps", type=int, default=None, help="digits steps per cell (default 100)")
    c.add_argument("--reps", type=int, default=1)
    c.add_argument("--cifar", action="store_true", help="also 32x32x3 WRN-16-2 -> WRN-16-1, batch 128")
    c.add_argument("--cifar-only", action="store_true")
    c.add_argument("--cifar-synths", default="zskt")
    c.add_argument("--cifar-steps", type=int, default=2)
    c.add_argument("--cifar-round-iters", type=int, default=20)
    c.add_argument("--from-log", default=None, help="render the cells a cost run printed to this log")

    cl = sub.add_parser("_cell")
    for k, d in (("--synth", "zskt"), ("--defense", "none"), ("--dataset", "digits"), ("--device", "cpu"),
                 ("--data-root", None), ("--teacher-file", None), ("--cache", ".abd_ray/cache")):
        cl.add_argument(k, default=d)
    for k, d in (("--steps", 100), ("--eval-every", 50), ("--threads", 1), ("--batch", None)):
        cl.add_argument(k, type=int, default=d)
    cl.add_argument("--sr-start", type=float, default=0.0)
    cl.add_argument("--set", action="append")
    cl.add_argument("--barrier", default=None, help="DIR:N: once set up, wait until N cells have checked in to DIR "
                    "(cells started together then run their loops together)")
    return {"cost": cost_main, "_cell": lambda args, argv: cell_main(args)}
