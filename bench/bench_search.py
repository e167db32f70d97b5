"""Search efficiency (``bench/run.py search``): hypervolume of the (clean_acc, asr) front against finished trials.

Digits / badnet_grid / zskt. Every sampler (tpe, nsga2, gp, random) runs as a real study (Ray Tune + Optuna +
MLflow, :func:`abd_ray.study.runner.launch`) on a generated study file, over one of three spaces (``--space``):

- ``coef`` (default; the vaccine's strength alone, the quickstart's space): ``coef`` in [1, 10] (log), the
  vaccine's other hyperparameters at their defaults. Grid: 9 log-spaced coef values from 1 to 10.
- ``sv`` (the vaccine alone, with its layer count): ``coef`` in [0.1, 10] (log) and ``n_shuf_layer`` in
  {auto, 2, 3} (cnn_l has three convolutions; ``auto`` is the last one). Grid: coef 0.1/1/10 x n_shuf_layer
  auto/2/3, 9 distinct points.
- ``abd`` (the paper's sweep with SR): ``coef`` in [0.1, 10] (log), ``inner_round`` in [10, 20] (``when`` SR is
  on: it means nothing with SR off), SR on/off (``sr_start`` in {on, 1.0}: at 1.0 the second stage never starts).
  Grid: coef 0.1/1/10 x inner_round 10/20 x SR on/off, 12 points of which 9 are distinct.

The grid runs through the same runner, its points handed to the study as fixed trials. By default each sampler
starts from the product's warm start (the defense's defaults, then coef's low and high ends; ``--no-warm-start``:
the sampler alone); the warm start's corners are grid points, so they are answered from the grid's trials.
Hypervolume: reference point (clean_acc 0, asr 100), both in percent, so the largest possible value is 10,000.
``--pair`` picks the teacher -> student pair: ``cnn`` (the embedded default, cnn_l -> cnn_s) or ``wrn`` (the
paper's WRN-16-2 -> WRN-16-1, whose vaccine shuffles the last 5 of 16 convolutions); each pair has its own table.

Trials are deterministic, so every study of the benchmark shares one record of finished trials keyed by resolved
config and science code (``bench/results/search_trials.jsonl``, :class:`abd_ray.study.search.ReuseStore`): a
rerun after a change pays only for the trials whose config or science changed (``--no-reuse`` runs everything).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from abd_ray.study.report import hypervolume
from abd_ray.study.spec import SearchSpec

SAMPLERS = ("tpe", "nsga2", "gp", "random")
DEFAULT_SAMPLER = SearchSpec().sampler  # the sampler the target is judged on: what a study file gets by default


def curve(rows: list[dict[str, Any]]) -> list[float]:
    """Hypervolume after each finished trial, in the order the trials finished."""
    out, pts = [], []
    for r in rows:
        pts.append((r["clean_acc"], r["asr"]))
        out.append(hypervolume(pts))
    return out


# The searched space of each ``--space`` preset, as study-file YAML (``{sr_on}``: the sr_start that turns SR on).
SPACES = {
    "coef": """    coef: {{low: 1.0, high: 10.0, log: true}}
""",
    "sv": """    coef: {{low: 0.1, high: 10.0, log: true}}
    n_shuf_layer: {{choices: [auto, 2, 3]}}
""",
    "abd": """    coef: {{low: 0.1, high: 10.0, log: true}}
    sr_start: {{choices: [{sr_on}, 1.0]}}
    inner_round: {{low: 10, high: 20, when: {{sr_start: {sr_on}}}}}
""",
}
# The teacher -> student pair of each ``--pair``, and what the vaccine's ``auto`` layer count means on its teacher.
PAIRS = {"cnn": ("cnn_l", "cnn_s", "the last of cnn_l's 3 convolutions"),
         "wrn": ("wrn16_2", "wrn16_1", "the last 5 of wrn16_2's 16 convolutions")}
# The defense each space searches.
SPACE_DEFENSE = {"coef": "sv", "sv": "sv", "abd": "abd"}
# The coef space's grid: 10 ** (k / 8), k = 0..8, rounded to 3 significant digits (1 and 10 exact).
COEF_GRID = tuple(float(f"{10 ** (k / 8):.3g}") for k in range(9))


def study_yaml(name: str, sampler: str, n: int, seed: int, steps: int, sr_on: float, concurrent: int,
               space: str = "abd", warm_start: bool = False, pair: str = "cnn") -> str:
    teacher, student, _ = PAIRS[pair]
    return f"""name: {name}
mode: search
dataset: digits
attacks: [badnet_grid]
synthesizers: [zskt]
defenses: []
seeds: [{seed}]
teacher: {{arch: {teacher}}}
student: {{arch: {student}}}
budget: {{steps: {steps}, eval_every: {steps // 2}, batch_size: 64}}
resources: {{cpu: 1, gpu: 0}}
max_concurrent: {concurrent}
max_failures: 1
search:
  defense: {SPACE_DEFENSE[space]}
  sampler: {sampler}
  num_samples: {n}
  seed: {seed}
  include_defaults: {str(warm_start).lower()}
  population_size: 4
  space:
""" + SPACES[space].format(sr_on=sr_on)


def warm_start_points(space: str, sr_on: float) -> list[dict[str, Any]]:
    """The points a sampler's study enqueues first (the product's default warm start), as its study file sets it."""
    import yaml

    from abd_ray.study.search import default_point
    from abd_ray.study.spec import StudySpec

    raw = yaml.safe_load(study_yaml("warm", DEFAULT_SAMPLER, 6, 0, 10, sr_on, 1, space, warm_start=True))
    search = StudySpec.from_dict(raw).search
    return search.warm_start(default_point(search))


def grid_points(sr_on: float, space: str = "abd") -> list[dict[str, Any]]:
    """The grid's points (flat config keys) of a ``--space`` preset."""
    if space == "coef":
        return [{"defense.coef": coef} for coef in COEF_GRID]
    if space == "sv":
        return [{"defense.coef": coef, "defense.n_shuf_layer": k} for coef in (0.1, 1.0, 10.0)
                for k in ("auto", 2, 3)]
    pts = []
    for coef in (0.1, 1.0, 10.0):
        for sr in (sr_on, 1.0):
            for ir in ((10, 20) if sr < 1.0 else (10,)):
                pts.append({"defense.coef": coef, "defense.inner_round": ir, "defense.sr_start": sr})
    return pts


def run_study(path: Path, storage: Path, cache: str, grid: list[dict[str, Any]] | None,
              store: Path | None = None, defense: str = "abd") -> Path:
    """Launch one study in this process; with ``grid``, the study's fixed trials are the grid's points; with
    ``store``, finished trials recorded there answer their twins."""
    from abd_ray.study import runner
    from abd_ray.study.spec import StudySpec

    orig_grid, orig_planned = StudySpec.grid_configs, StudySpec.planned_trials
    if grid is not None:
        def grid_configs(self):  # the grid's points as fixed trials of the searched defense
            base = self.base_config(self.attacks[0], self.synthesizers[0], defense, self.seeds[0], "grid")
            return [{**base, **p} for p in grid]

        StudySpec.grid_configs = grid_configs
        StudySpec.planned_trials = lambda self: len(grid)
    try:
        study_dir, finished = runner.launch(path, storage=str(storage), tracking_uri=f"sqlite:///{storage}/mlflow.db",
                                     cache_dir=cache, reuse_store=str(store) if store else None,
                                     echo=lambda m: print(m, flush=True))
    finally:
        StudySpec.grid_configs, StudySpec.planned_trials = orig_grid, orig_planned
    if not finished:
        raise SystemExit(f"study {study_dir} was interrupted: stopping (rerun with --resume to keep finished runs)")
    return study_dir


def rows_of(study_dir: Path) -> list[dict[str, Any]]:
    from abd_ray.study.folder import experiment_path, read_state
    from abd_ray.study.report import trial_rows
    from abd_ray.study.tuner import tune_trials

    trials = tune_trials(experiment_path(read_state(study_dir)))
    ended = {t["trial_id"]: float(t["last_result"].get("timestamp", 0)) for t in trials}
    rows = [r for r in trial_rows(trials) if r["status"] == "TERMINATED"]
    rows.sort(key=lambda r: ended[r["trial_id"]])  # the order in which trials finished
    return rows


def search_main(args: argparse.Namespace, argv: list[str]) -> None:
    import run as R  # bench/run.py (on sys.path)

    if args.pair != "cnn" and args.space != "coef":
        raise SystemExit(f"--pair {args.pair} runs the coef space only (the sv space's layer choices are cnn_l's): "
                         "drop --space or use --pair cnn")
    steps = 10 if args.smoke else args.steps
    n = 2 if args.smoke else args.trials
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    samplers = ["tpe"] if args.smoke else args.samplers.split(",")
    warm = not args.no_warm_start
    # One table per space and pair: the abd space's runs (without the warm start) stay in search.json.
    name = "search" if args.space == "abd" else f"search_{args.space}"
    name += "" if args.pair == "cnn" else f"_{args.pair}"
    work = Path(tempfile.mkdtemp(prefix="abd-bench-search-"))
    out_json = R.RESULTS / (f"{name}_smoke.json" if args.smoke else f"{name}.json")
    store = None if args.no_reuse else R.RESULTS / f"search_trials{'_smoke' if args.smoke else ''}.jsonl"
    keep = out_json.exists() and (args.resume or args.render)
    doc: dict[str, Any] = json.loads(out_json.read_text()) if keep else {}
    if keep and not args.render:
        # Runs at another budget or start are not comparable: refuse to mix them into one table.
        asked = {"steps": steps, "sr_on": args.sr_on, "trials_per_sampler": n, "space": args.space,
                 "warm_start": warm, "pair": args.pair}
        held = {k: doc.get(k, {"space": "abd", "warm_start": False, "pair": "cnn"}.get(k)) for k in asked}
        if any(held[k] is not None and held[k] != asked[k] for k in held):
            raise SystemExit(f"{out_json} holds runs at {held}, this command asks for {asked}: rerun with the same "
                             "--steps/--sr-on/--trials/--space/--no-warm-start to add runs, or without --resume to "
                             "start a new table")
    if not args.render:
        doc.update({"machine": R.machine(), "command": R.cmdline(argv), "steps": steps, "sr_on": args.sr_on,
                    "trials_per_sampler": n, "seeds": seeds, "space": args.space, "warm_start": warm,
                    "pair": args.pair})
    doc.setdefault("runs", {})
    grid = grid_points(args.sr_on, args.space)[: (2 if args.smoke else None)]
    for seed in ([] if args.render else seeds):
        jobs = [("grid", None)] + [(s, s) for s in samplers]
        for label, sampler in jobs:
            key = f"{label}/seed{seed}"
            if key in doc["runs"]:
                continue
            study = f"bench-{name}-{label}-s{seed}-{int(time.time())}"
            f = work / f"{study}.yaml"
            # The grid's study file asks for one search trial (a search study needs one); run_study caps the study
            # at the grid's points, so it never runs.
            f.write_text(study_yaml(study, sampler or "random", 1 if sampler is None else n, seed, steps,
                                    args.sr_on, args.concurrent, args.space, warm, args.pair))
            t0, l0 = time.perf_counter(), R.load()
            study_dir = run_study(f, work / "studies", args.cache, grid if sampler is None else None, store,
                                  defense=SPACE_DEFENSE[args.space])
            rows = rows_of(study_dir)
            if sampler is None:
                rows = [r for r in rows if r["kind"] == "grid"]
            doc["runs"][key] = {
                "label": label, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "load": [l0, R.load()],
                "command": R.cmdline(argv), "date": R.machine()["date"], "commit": R.git_commit(),
                "trials": [{k: r[k] for k in ("trial_id", "clean_acc", "asr", "params", "wall_s", "reused_from")}
                           for r in rows],
                "reused": sum(bool(r["reused_from"]) for r in rows),
                "hv": curve(rows),
            }
            print(json.dumps({"run": key, "hv": doc["runs"][key]["hv"], "wall_s": doc["runs"][key]["wall_s"],
                              "reused": doc["runs"][key]["reused"], "trials": len(rows)}), flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    summary = summarise(doc)
    doc["summary"] = summary
    out_json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png = R.RESULTS / (f"{name}_smoke.png" if args.smoke else f"{name}.png")
    plot(doc, png)
    md = markdown(doc, png)
    print(md)
    if not args.smoke:
        R.update_section(name, md)


def trials_to_95(hv: list[float], grid_final: float | None) -> int | None:
    """How many finished trials a run needed to reach 95% of the grid's final HV (None: never, or no grid)."""
    if not grid_final:
        return None
    return next((i + 1 for i, v in enumerate(hv) if v >= 0.95 * grid_final), None)


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """Per sampler: mean HV curve over seeds, and the first trial count reaching 95% of the grid's final HV."""
    runs = doc["runs"]
    seeds = sorted({r["seed"] for r in runs.values()})
    labels = list(dict.fromkeys(r["label"] for r in runs.values()))
    out: dict[str, Any] = {"grid_final_hv": {}, "reach95": {}, "mean_curve": {}}
    for s in seeds:
        g = runs.get(f"grid/seed{s}")
        if g and g["hv"]:
            out["grid_final_hv"][s] = g["hv"][-1]
    for lab in labels:
        curves = [runs[f"{lab}/seed{s}"]["hv"] for s in seeds if f"{lab}/seed{s}" in runs]
        if not curves:
            continue
        m = min(len(c) for c in curves)
        out["mean_curve"][lab] = [statistics.fmean(c[i] for c in curves) for i in range(m)]
        reach = []
        for s in seeds:
            r, g = runs.get(f"{lab}/seed{s}"), out["grid_final_hv"].get(s)
            if r is None or g is None:
                continue
            reach.append(trials_to_95(r["hv"], g))
        out["reach95"][lab] = reach
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, c in doc["summary"]["mean_curve"].items():
        n = sum(r["label"] == lab for r in doc["runs"].values())
        label = f"{lab} (mean of {n} seeds)" if n > 1 else f"{lab} (1 seed)"
        ax.plot(range(1, len(c) + 1), c, marker="o", label=label, linestyle="--" if lab == "grid" else "-")
    for g in doc["summary"]["grid_final_hv"].values():
        ax.axhline(0.95 * g, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume (clean_acc, asr), ref (0, 100)")
    teacher, student, _ = PAIRS[doc.get("pair", "cnn")]
    ax.set_title(f"digits/badnet_grid/zskt, {teacher} -> {student}, {doc.get('space', 'abd')} space, "
                 f"{doc['steps']} steps/trial", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(doc: dict[str, Any], png: Path) -> str:
    import run as R

    s = doc["summary"]
    runs = doc["runs"]
    seeds = sorted({r["seed"] for r in runs.values()})
    grid_n = max((len(r["hv"]) for r in runs.values() if r["label"] == "grid"), default=0)
    space, warm = doc.get("space", "abd"), doc.get("warm_start", False)
    teacher, student, auto_layers = PAIRS[doc.get("pair", "cnn")]
    if space == "coef":
        about = (f"Reduced budget: {doc['steps']} steps per trial (the digits default is 3000). Space: the "
                 "vaccine's strength alone, as the quickstart searches it (`search.defense: sv`), coef in [1, 10] "
                 "(log); the vaccine's other hyperparameters at their defaults (n_shuf_layer auto = "
                 f"{auto_layers}). Grid: coef {' / '.join(f'{c:g}' for c in COEF_GRID)}, {grid_n} points.")
    elif space == "sv":
        about = (f"Reduced budget: {doc['steps']} steps per trial (the digits default is 3000). Space: the vaccine "
                 "alone (`search.defense: sv`), coef in [0.1, 10] (log) x n_shuf_layer in {auto (= "
                 f"{auto_layers}), 2, 3}}. Grid: coef 0.1/1/10 x n_shuf_layer auto/2/3, {grid_n} points.")
    else:
        about = (f"Reduced budget: {doc['steps']} steps per trial (the digits default is 3000), SR on = `sr_start` "
                 f"{doc['sr_on']} (SR for the last {round((1 - doc['sr_on']) * doc['steps'])} steps), SR off = "
                 "`sr_start` 1.0. Grid: coef 0.1/1/10 x inner_round 10/20 x SR on/off = 12 nominal points, "
                 f"{grid_n} distinct (inner_round is moot with SR off).")
    ends = [p["defense.coef"] for p in warm_start_points(space, doc["sr_on"])[1:]]
    start = ("Each sampler starts from the default warm start (`include_defaults: true`): the defense's defaults, "
             f"then coef at {' and at '.join(f'{c:g}' for c in ends)} (both grid points, answered from the grid's "
             f"trials), then {max(0, doc['trials_per_sampler'] - 1 - len(ends))} proposals of its own." if warm else
             "No warm start (`include_defaults: false`): every trial is the sampler's own.")
    pair = "" if doc.get("pair", "cnn") == "cnn" else f"{teacher} -> {student}, "
    lines = [f"## Search efficiency: hypervolume vs finished trials (digits, badnet_grid, zskt, {pair}{space} space)",
             "",
             "Commands (in the order they ran; with `--resume` each adds the runs that the results file lacks):", "",
             *[f"    {c}" for c in dict.fromkeys(r.get("command", doc["command"]) for r in runs.values())], "",
             f"Machine: {R.machine_line(doc['machine'])}", "",
             f"{about} Each sampler: a real study (`abd_ray.study.runner.launch`: Ray Tune + Optuna + MLflow) of "
             f"{doc['trials_per_sampler']} trials, 2 at a time, 1 CPU each, sampler seed = run seed; the grid runs "
             f"through the same runner as fixed trials. {start} Seeds: {seeds}. Trials are deterministic, so a "
             "trial equal to a finished one (of any run of the benchmark) is answered from it (`reused`). "
             "Hypervolume ref (clean_acc 0, asr 100); max 10,000.", "",
             f"![hypervolume vs trials]({png.relative_to(R.HERE)})", "",
             "| run | seed | HV after each finished trial | final HV | trials to 95% of grid's final HV "
             "| study wall s |",
             "|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["label"] for r in runs.values()))  # grid first, then samplers as first run
    for r in sorted(runs.values(), key=lambda r: (r["seed"], order.index(r["label"]))):  # by seed, whatever ran when
        hit = trials_to_95(r["hv"], s["grid_final_hv"].get(r["seed"]))
        lines.append(f"| {r['label']} | {r['seed']} | {', '.join(f'{v:.0f}' for v in r['hv'])} | "
                     f"{r['hv'][-1] if r['hv'] else float('nan'):.0f} | {hit if hit else 'not reached'} | "
                     f"{r['wall_s']:.0f} (load {r['load'][0]}->{r['load'][1]}) |")
    lines.append("")
    grid_seeds = sorted(s["grid_final_hv"])
    n_warm = len(warm_start_points(space, doc["sr_on"])) if warm else 0
    lines += ["| sampler | seeds run | trials to 95% of the grid's final HV, per seed | worst seed | "
              + (f"HV after the warm start ({n_warm} trials) -> final, per seed |" if warm else "final HV, per seed |"),
              "|---|---|---|---|---|"]
    for lab, reach in s["reach95"].items():
        if lab == "grid":
            continue
        ran = sorted(r["seed"] for r in runs.values() if r["label"] == lab and r["seed"] in grid_seeds)
        worst = "not reached" if any(h is None for h in reach) else (max(reach) if reach else "-")
        hvs = [runs[f"{lab}/seed{sd}"]["hv"] for sd in ran]
        gain = ", ".join((f"{h[n_warm - 1]:.0f} -> {h[-1]:.0f}" if warm and len(h) >= n_warm else f"{h[-1]:.0f}")
                         for h in hvs if h)
        lines.append(f"| {lab} | {ran} | {', '.join(str(h) if h else 'not reached' for h in reach)} | {worst} | "
                     f"{gain} |")
    lines.append("")
    nominal = 12 if space == "abd" else grid_n
    third = nominal / 3

    def verdict(lab: str) -> str | None:
        """A sampler's worst seed against the target, if it ran on every seed with a grid."""
        reach = s["reach95"].get(lab)
        ran = {r["seed"] for r in runs.values() if r["label"] == lab}
        if not reach or not set(grid_seeds) <= ran:
            return None
        worst = None if any(h is None for h in reach) else max(reach)
        return (f"{lab}: {worst if worst else 'not reached'} (worst of seeds {grid_seeds}) -> "
                f"{'met' if worst and worst <= third else 'NOT met'}")

    default = verdict(DEFAULT_SAMPLER)
    others = [v for lab in s["reach95"] if lab not in ("grid", DEFAULT_SAMPLER) and (v := verdict(lab))]
    lines.append(f"Target: the default sampler ({DEFAULT_SAMPLER}) reaches 95% of the grid's final hypervolume within "
                 f"a third of the grid's trials ({third:.0f} of {nominal}) on every seed. "
                 f"{default or f'{DEFAULT_SAMPLER} has not run on every seed with a grid yet.'}"
                 + (f" Others: {'; '.join(others)}." if others else ""))
    if warm:
        lines.append("")
        lines.append(f"With the warm start, a sampler's first {n_warm} trials are the same points for every "
                     "sampler (the defaults and coef's two ends), so a sampler that reaches the target within "
                     f"{n_warm} trials does so through the warm start; the samplers differ only in the HV their own "
                     "proposals add after it (the last column).")
    lines.append("")
    return "\n".join(lines)


def register(sub) -> dict[str, Any]:
    p = sub.add_parser("search", help="search efficiency: hypervolume vs trials for 4 samplers and the paper grid")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sr-on", type=float, default=0.9)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seeds", default="0")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="keep the runs already in search.json")
    p.add_argument("--render", action="store_true", help="run nothing: plot and tabulate the runs in search.json")
    p.add_argument("--space", choices=sorted(SPACES), default="coef",
                   help="the searched space: coef (the vaccine's strength, as the quickstart), sv (coef and the "
                        "vaccine's layer count) or abd (with SR on/off)")
    p.add_argument("--pair", choices=sorted(PAIRS), default="cnn",
                   help="the teacher -> student pair: cnn (cnn_l -> cnn_s, the embedded default) or wrn (wrn16_2 -> "
                        "wrn16_1, the paper's; with the coef space only)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="the sampler alone, without the defaults and coef's ends enqueued first")
    p.add_argument("--no-reuse", action="store_true",
                   help="run every trial, even those search_trials.jsonl holds a finished twin of")
    return {"search": search_main}

