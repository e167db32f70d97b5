"""One entry point for every abd-ray benchmark. Benchmarks are measurements, never tests.

    .venv/bin/python bench/run.py --smoke                 # every benchmark, seconds each: checks that they run
    .venv/bin/python bench/run.py cost                    # KD-loop cost per step, synthesizer x defense (digits)
    .venv/bin/python bench/run.py cost --cifar            # ... and WRN-16-2 -> WRN-16-1, 32x32x3, batch 128
    .venv/bin/python bench/run.py zskt                    # the seed's ZSKT step vs ours (interleaved, CPU time)
    .venv/bin/python bench/run.py ray                     # Ray's overhead: quickstart as a study vs plain calls
    .venv/bin/python bench/run.py search                  # search efficiency: hypervolume vs trials, 4 samplers + grid
                                                          # (--space sv: the vaccine alone; --space abd: with SR)
    .venv/bin/python bench/run.py gpu                     # the GPU figures (what bench/gpu.sh runs)
    .venv/bin/python bench/run.py all                     # cost, zskt, ray, search (not gpu)

Each benchmark writes ``bench/results/<name>.json`` and rewrites its own section of ``bench/RESULTS.md`` (between
``<!-- BEGIN name -->`` / ``<!-- END name -->``), with the command, the machine (CPU model, cores, torch) and the
date. ``--smoke`` runs write ``*_smoke.json`` and leave RESULTS.md alone.

How the figures are taken, on a machine that is shared (two cores, other engineers' jobs):
- every cost cell runs in a fresh subprocess, so ``ru_maxrss`` is that cell's peak resident memory (tracemalloc does
  not see torch's allocations); torch runs single-threaded there, so the process CPU time per step is what the wall
  time would be on an idle core, and is the figure ratios are taken from (wall time is recorded beside it, with the
  1-minute load average);
- A/B comparisons are interleaved within one run (the cells of one synthesizer run back to back; the seed/ours
  ZSKT steps alternate rep by rep).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
PY = sys.executable


# --- machine, results files, RESULTS.md ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    from abd_ray.engine.repro import processor

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": processor(torch.device("cpu")), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": gpu, "date": _dt.date.today().isoformat()}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores{gpu}; torch {m['torch']}, Python {m['python']}; {m['date']}"


def write_json(name: str, doc: dict[str, Any], smoke: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / (f"{name}_smoke.json" if smoke else f"{name}.json")
    p.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    return p


SECTION_ORDER = ("cost", "cost_cifar", "zskt", "ray", "ray_notes", "search", "search_notes", "search_sv",
                 "search_sv_notes", "search_coef", "search_coef_notes", "gpu", "findings")
HEADER = """# abd-ray benchmark results

Written by `bench/run.py` (one section per benchmark; a section is rewritten when its benchmark is run again).
Every figure comes with the command that produced it, the machine and the date. Ratios are taken within one run;
timings on this shared two-core machine carry the 1-minute load average measured beside them.
"""


def update_section(name: str, body: str) -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        # keep the sections in a fixed order
        later = [s for s in SECTION_ORDER[SECTION_ORDER.index(name) + 1:] if f"<!-- BEGIN {s} -->" in text] \
            if name in SECTION_ORDER else []
        if later:
            at = text.index(f"<!-- BEGIN {later[0]} -->")
            text = text[:at] + block + "\n\n" + text[at:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)


def publish(name: str, rows: list[dict[str, Any]], out: str, body: str) -> None:
    """Write a benchmark's rows to ``out`` (JSON), print its RESULTS.md section and put it in place."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    print(body)
    update_section(name, body)


def git_commit() -> str | None:
    """The checkout's commit (short hash, ``+`` when tracked files other than the benchmarks' own outputs have
    uncommitted changes), or None outside git. A run that writes ``bench/results`` or ``RESULTS.md`` does not mark
    the next one."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/results", ":!bench/RESULTS.md"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+" if dirty else "")


def cmdline(argv: list[str]) -> str:
    return ".venv/bin/python bench/run.py " + " ".join(argv)


# --- the seed's ZSKT step vs ours, interleaved ---------------------------------------------------------------------


def zskt_main(args: argparse.Namespace, argv: list[str]) -> None:
    """Reuses bench/zskt_step.py's step functions; alternates seed / ours / ours+channels_last rep by rep."""
    import torch

    sys.path.insert(0, str(HERE))
    import zskt_step as zs  # the distillation engineer's benchmark: its step functions, not a copy

    from abd_ray.defenses import Defense
    from abd_ray.models import build_model
    from abd_ray.synthesizers import SynthContext, synthesizer_class

    torch.set_num_threads(args.threads)
    batch, reps, n_s = (8, 1, 2) if args.smoke else (args.batch, args.reps, 10)
    dev = torch.device("cpu")
    data, T, S = zs.models(batch, dev, False)
    G = build_model("generator", shape=data.shape, z_dim=100, ngf=64, mean=data.mean, std=data.std).train()
    opt_g, opt_s = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(S.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)

    def seed_fn(r: int) -> None:
        zs.seed_pseudo_batch(G, T, S, opt_g, opt_s, batch, n_s, 250.0, gen)

    def ours(cl: bool):
        d, t, s = zs.models(batch, dev, cl)
        ctx = SynthContext(t, s, d, dev, 80000, batch, Defense(), torch.Generator().manual_seed(1),
                           torch.Generator().manual_seed(2))
        synth = synthesizer_class("zskt")(ctx, {"n_s": n_s})
        if cl:
            synth.generator = synth.generator.to(memory_format=torch.channels_last)
        o = synth.student_optimizer(s.parameters())
        return lambda r: zs.our_pseudo_batch(synth, s, o, r)

    fns = {"seed": seed_fn, "ours": ours(False), "ours_channels_last": ours(True)}
    times: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(0)  # warm-up
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t, c = time.perf_counter(), time.process_time()
            fns[k](r + 1)
            times[k].append({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "load": load()})
            print(k, json.dumps(times[k][-1]), flush=True)
    med = {k: {"cpu_s": statistics.median(x["cpu"] for x in v), "wall_s": statistics.median(x["wall"] for x in v)}
           for k, v in times.items()}
    doc = {"machine": machine(), "command": cmdline(argv), "batch": batch, "n_s": n_s, "reps": reps,
           "threads": args.threads, "times": times, "median": med,
           "speedup_cpu": {k: med["seed"]["cpu_s"] / med[k]["cpu_s"] for k in ("ours", "ours_channels_last")},
           "speedup_wall": {k: med["seed"]["wall_s"] / med[k]["wall_s"] for k in ("ours", "ours_channels_last")}}
    write_json("zskt", doc, args.smoke)
    loads = [x["load"] for v in times.values() for x in v]
    md = "\n".join([
        "## ZSKT pseudo batch: the seed's step structure vs ours (paper config)", "",
        f"Command: `{doc['command']}`  ", f"Machine: {machine_line(doc['machine'])}", "",
        f"WRN-16-2 -> WRN-16-1, 32x32x3, batch {batch}, 1 generator + {n_s} student steps (KD + 250 x AT), "
        f"{args.threads} thread(s), median of {reps} reps after a warm-up, the three variants alternating rep by rep "
        f"(load {min(loads):.1f}-{max(loads):.1f}). Step functions from `bench/zskt_step.py` (seed: G and T re-run at "
        "each of the 11 iterations, student backward into G; ours: `ZSKT.batches` + the engine's student step).", "",
        "| variant | CPU s / pseudo batch | wall s | speedup (CPU) | speedup (wall) |", "|---|---|---|---|---|",
        f"| seed | {med['seed']['cpu_s']:.2f} | {med['seed']['wall_s']:.2f} | 1.00x | 1.00x |",
        f"| ours | {med['ours']['cpu_s']:.2f} | {med['ours']['wall_s']:.2f} | {doc['speedup_cpu']['ours']:.2f}x | "
        f"{doc['speedup_wall']['ours']:.2f}x |",
        f"| ours + channels_last | {med['ours_channels_last']['cpu_s']:.2f} | {med['ours_channels_last']['wall_s']:.2f}"
        f" | {doc['speedup_cpu']['ours_channels_last']:.2f}x | {doc['speedup_wall']['ours_channels_last']:.2f}x |",
        "", "Target: >= 4x the seed's step at the paper's config. `distill()` puts the "
        "teacher and student in channels_last on the CPU for 32x32 inputs (the generator stays contiguous there), "
        "i.e. between the two `ours` rows.", ""])
    print(md)
    if not args.smoke:
        update_section("zskt", md)


# --- entry ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a seconds-long check of each benchmark; writes *_smoke.json")
    ap.add_argument("--cache", default=os.environ.get("ABD_RAY_CACHE", str(ROOT / ".abd_ray" / "cache")))
    sub = ap.add_subparsers(dest="cmd")

    z = sub.add_parser("zskt", help="the seed's ZSKT pseudo batch vs ours, interleaved")
    z.add_argument("--reps", type=int, default=3)
    z.add_argument("--batch", type=int, default=128)
    z.add_argument("--threads", type=int, default=1)

    sub.add_parser("all", help="cost, zskt, ray and search with their defaults")
    from_ext = _register_more(sub)

    args = ap.parse_args(argv)
    runners = {"zskt": zskt_main, **from_ext}
    if args.cmd and args.cmd.startswith("_"):  # a helper process of another benchmark: no banner on its stdout
        runners[args.cmd](args, argv)
        return 0
    todo = [args.cmd] if args.cmd and args.cmd != "all" else [n for n in ("cost", "zskt", "ray", "search")
                                                              if n in runners]
    for name in todo:
        a = args if args.cmd == name else ap.parse_args([*(["--smoke"] if args.smoke else []), "--cache", args.cache,
                                                         name])
        t0 = time.perf_counter()
        print(f"=== {name} (load {load()})", flush=True)
        runners[name](a, argv if args.cmd == name else [*(["--smoke"] if args.smoke else []), name])
        print(f"=== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def _register_more(sub) -> dict[str, Any]:
    """Subcommands that live in their own modules (cost per step, Ray overhead, search efficiency, GPU)."""
    sys.path.insert(0, str(HERE))
    out: dict[str, Any] = {}
    for mod_name in ("bench_cost", "bench_ray", "bench_search", "bench_gpu"):
        try:
            mod = __import__(mod_name)
        except ImportError:
            continue
        out.update(mod.register(sub))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
