"""The study report: Pareto fronts, the paper-style table, der against the undefended twin, the recommended config.

Read from the study folder alone (Tune's experiment files, ``optuna.db`` and the tracking database), so it runs
while or after a study runs, without Ray. Multi-objective results have no single "best" trial (Tune's
``get_best_result`` refuses them), so the non-dominated set is computed here: maximise ``clean_acc``, minimise
``asr``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from abd_ray.stats import format_mean_std, format_ms, mean_std
from abd_ray.study.folder import REPORT_DIR, StudyFolder
from abd_ray.study.front import by_config, finite, hypervolume, pareto_front, recommend, search_against_start
from abd_ray.study.spec import cell_key

# --- reading a study ------------------------------------------------------------------------------------------------


# What the defenses' probes measured at a trial's last evaluation against the real test sets (the SV suspect's
# detection of triggered test images; whether SR's perturbation is the trigger), with the report's column titles.
DIAGNOSTICS = {
    "sv_auc": "SV suspect AUC",
    "sv_mask_poison": "SV masks triggered %",
    "sv_mask_clean": "SV masks clean %",
    "sv_masked_frac": "SV masked synthetic",
    "sr_flip": "SR flip %",
    "sr_flip0": "SR flip at delta 0 %",
    "sr_trigger_target_rate": "teacher on x+delta: target %",
    "sr_student_target_rate": "student on x+delta: target %",
    "sr_trigger_cos": "cos(delta, trigger)",
}


def trial_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per Tune trial: identity, hyperparameters, final metrics (NaN where it did not finish)."""
    rows = []
    for tr in trials:
        c, r = tr["config"], tr["last_result"]
        final = bool(r.get("final"))

        def m(key: str, r=r, final=final) -> float:
            v = r.get(key)
            return float(v) if final and finite(v) else float("nan")

        rows.append({
            "trial_id": tr["trial_id"],
            "status": tr["status"] if (final or tr["status"] != "TERMINATED") else "INCOMPLETE",
            "kind": c.get("study.kind", "grid"),
            "cell": c.get("study.cell", cell_key(c.get("attack.name"), c.get("synthesizer"))),
            "attack": c.get("attack.name"),
            "synthesizer": c.get("synthesizer"),
            "defense": c.get("defense"),
            "seed": c.get("seed"),
            "params": {k.split(".", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("defense.")},
            "clean_acc": m("clean_acc"),
            "asr": m("asr"),
            "robust_acc": m("robust_acc"),
            "teacher_clean_acc": m("teacher_clean_acc"),
            "teacher_asr": m("teacher_asr"),
            "wall_s": m("wall_s"),
            "step": r.get("step"),
            "error": tr.get("error"),
            "reused_from": c.get("study.reused_from"),
            "diagnostics": {k: m(k) for k in DIAGNOSTICS if k in r},
        })
    return sorted(rows, key=lambda x: (x["cell"], x["kind"] != "grid", x["defense"] != "none", str(x["defense"]),
                                       x["seed"] or 0, x["trial_id"]))


def _undefended_runs(rows: list[dict[str, Any]], cell: str, seed: Any = None) -> list[dict[str, Any]]:
    """The cell's finished undefended runs: the twin of ``seed`` if there is one, else all of them."""
    base = [r for r in rows if r["cell"] == cell and r["defense"] == "none" and finite(r["clean_acc"])]
    return [r for r in base if r["seed"] == seed] or base


def _undefended(rows: list[dict[str, Any]], cell: str, seed: Any = None) -> tuple[float, float]:
    use = _undefended_runs(rows, cell, seed)
    return mean_std([r["clean_acc"] for r in use])[0], mean_std([r["asr"] for r in use])[0]


# Self-Retrospection earns its place in a cell where ABD's asr is at least this many points below SV alone's, at
# no more than this many points of extra clean-accuracy cost (means over paired seeds).
SR_ASR_GAIN, SR_CLEAN_COST = 10.0, 2.0


def sr_effect(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What SR adds to the vaccine, per cell: ABD against SV alone, grid trials paired by seed.

    Args:
        done: finished trial rows (:func:`trial_rows`).

    Returns:
        One dict per cell with both defenses on at least one common seed: the seeds, the mean +- std of abd - sv in
        asr and in clean_acc, the mean ratio of their run times, and ``earns`` (:data:`SR_ASR_GAIN` points lower asr
        at no more than :data:`SR_CLEAN_COST` points of extra clean cost).
    """
    out = []
    for cell in sorted({r["cell"] for r in done}):
        runs = {d: [r for r in done if r["cell"] == cell and r["kind"] == "grid" and r["defense"] == d]
                for d in ("abd", "sv")}
        # A seed pairs only where each defense ran once on it (one fixed configuration per defense).
        once = {d: {s: r for s, r in ((r["seed"], r) for r in rs) if sum(x["seed"] == s for x in rs) == 1}
                for d, rs in runs.items()}
        seeds = sorted(set(once["abd"]) & set(once["sv"]), key=str)
        if not seeds:
            continue
        pairs = [(once["abd"][s], once["sv"][s]) for s in seeds]
        d_asr = mean_std([a["asr"] - v["asr"] for a, v in pairs])
        d_acc = mean_std([a["clean_acc"] - v["clean_acc"] for a, v in pairs])
        ratio = mean_std([a["wall_s"] / v["wall_s"] for a, v in pairs if finite(a["wall_s"]) and v["wall_s"] > 0])
        out.append({"cell": cell, "seeds": seeds, "n": len(seeds),
                    "asr_delta": d_asr[0], "asr_delta_std": d_asr[1],
                    "clean_delta": d_acc[0], "clean_delta_std": d_acc[1], "time_ratio": ratio[0],
                    "earns": d_asr[0] <= -SR_ASR_GAIN and d_acc[0] >= -SR_CLEAN_COST})
    return out


def build_report(study_dir: str | Path, max_acc_drop: float = 5.0) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict."""
    from abd_ray.metrics import der as der_of  # torch: imported here, so that `abd-ray status` stays fast
    from abd_ray.study.tuner import optuna_names, study_trials

    if not finite(max_acc_drop) or max_acc_drop < 0:
        raise ValueError(f"--max-acc-drop {max_acc_drop!r} must be a number >= 0 (percentage points), e.g. 5")
    folder = StudyFolder(study_dir)
    state = folder.read_state()
    spec = folder.spec(state)
    trials = study_trials(state)
    rows = trial_rows(trials)
    # A trial answered from a finished twin of this study repeats that twin's point: counted once, as the twin.
    own = {f"{state['name']}/{r['trial_id']}" for r in rows}
    done = [r for r in rows if finite(r["clean_acc"]) and r["reused_from"] not in own]
    cells = sorted({r["cell"] for r in rows})

    # der of each defended run against its undefended twin (same cell and seed; else the cell's mean).
    ders = []
    for r in done:
        if r["defense"] == "none":
            continue
        acc0, asr0 = _undefended(rows, r["cell"], r["seed"])
        d = der_of(acc0, asr0, r["clean_acc"], r["asr"]) if finite(acc0) else float("nan")
        r["der"] = d
        ders.append({"trial_id": r["trial_id"], "cell": r["cell"], "defense": r["defense"], "seed": r["seed"],
                     "kind": r["kind"], "clean_acc": r["clean_acc"], "asr": r["asr"], "undefended_clean_acc": acc0,
                     "undefended_asr": asr0, "der": d})

    fronts, recs = {}, {}
    # A search study recommends a configuration of the defense it searches; a grid study, any defended run.
    search_def = spec.search.defenses() if spec.search else None
    for cell in cells:
        pts = [r for r in done if r["cell"] == cell]
        fronts[cell] = [_brief(r) for r in pareto_front(pts)]
        acc0, asr0 = _undefended(rows, cell)
        base = _undefended_runs(rows, cell)
        # A configuration run on several seeds is judged by its mean over them, and says how many it rests on.
        rec = recommend(by_config(pts), acc0, max_acc_drop, defense=search_def)
        if rec is not None and rec["n"] > 1 and finite(acc0):
            rec["der"] = der_of(acc0, asr0, rec["clean_acc"], rec["asr"])
        recs[cell] = None if rec is None else {
            **_brief(rec), "undefended_clean_acc": acc0, "undefended_asr": asr0,
            "acc_drop": acc0 - rec["clean_acc"] if finite(acc0) else None,
            **{k: rec[k] for k in ("n", "seeds", "trial_ids", "clean_acc_std", "asr_std")},
            "undefended": {k: format_mean_std([r[k] for r in base]) for k in ("clean_acc", "asr")},
        }

    start = warm_start_trials(spec.search) if spec.search else []
    searched = {cell: search_against_start([r for r in done if r["cell"] == cell], start) for cell in cells
                if any(r["kind"] == "search" and r["cell"] == cell for r in done)}
    names = {p.name for p in spec.search.space} if spec.search else set()
    for s in searched.values():  # the table shows what the sampler chose, not the constants beside it
        for r in s["trials"]:
            r["params"] = {k: v for k, v in r["params"].items() if k in names}

    # Paper-style table: grid trials, mean ± std over seeds, per attack x (synthesizer, defense).
    table = []
    for attack in sorted({r["attack"] for r in rows}):
        for synth in sorted({r["synthesizer"] for r in rows if r["attack"] == attack}):
            for defense in sorted({r["defense"] for r in rows if r["attack"] == attack and r["synthesizer"] == synth
                                   and r["kind"] == "grid"}, key=lambda d: (d != "none", d)):
                grp = [r for r in done if r["attack"] == attack and r["synthesizer"] == synth
                       and r["defense"] == defense and r["kind"] == "grid"]
                acc, acc_s, _ = mean_std([r["clean_acc"] for r in grp])
                asr, asr_s, _ = mean_std([r["asr"] for r in grp])
                t_acc = mean_std([r["teacher_clean_acc"] for r in grp])[0]
                t_asr = mean_std([r["teacher_asr"] for r in grp])[0]
                table.append({"attack": attack, "synthesizer": synth, "defense": defense, "n": len(grp),
                              "clean_acc": acc, "clean_acc_std": acc_s, "asr": asr, "asr_std": asr_s,
                              "teacher_clean_acc": t_acc, "teacher_asr": t_asr,
                              "clean_acc_text": format_mean_std([r["clean_acc"] for r in grp]),
                              "asr_text": format_mean_std([r["asr"] for r in grp])})

    counts = _counts(state, folder, rows, optuna_names(spec))
    from abd_ray.tracking import ui_links

    return {
        "study": state["name"],
        "study_dir": str(folder),
        "status": state.get("status"),
        "max_acc_drop": max_acc_drop,
        "counts": counts,
        "trials": rows,
        "pareto": fronts,
        "table": table,
        "der": ders,
        "sr_effect": sr_effect(done),
        "search": searched,
        "recommended": recs,
        "hypervolume": {cell: hypervolume([(r["clean_acc"], r["asr"]) for r in f]) for cell, f in fronts.items()},
        "mlflow": ui_links(state["tracking_uri"], state.get("mlflow_experiment_id"), state.get("parent_run_id")),
    }


def warm_start_trials(search: Any) -> list[dict[str, Any]]:
    """The warm start's points as the trials they become: the defense each runs (a switch may change it) and its
    searched hyperparameters by name; the first is marked ``defaults`` when the study includes them."""
    from abd_ray.study.search import default_point

    out = []
    for i, pt in enumerate(search.warm_start(default_point(search))):
        out.append({"defense": search.switch_defense(pt), "defaults": i == 0 and search.include_defaults,
                    "params": {k.split(".", 1)[1]: v for k, v in pt.items() if k.startswith("defense.")}})
    return out


def mlflow_lines(links: dict[str, Any]) -> list[str]:
    """Where to look at a study in MLflow, as lines for the console and report.md."""
    if not links.get("experiment_url"):
        return []
    lines = [f"open MLflow:  {links['command']}"] if links.get("command") else []
    lines.append(f"runs view:    {links['experiment_url']}")
    if links.get("run_url"):
        lines += [f"its trials:   {links['trials_url']}", f"parent run:   {links['run_url']}"]
    return lines


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("trial_id", "kind", "cell", "defense", "seed", "params", "clean_acc", "asr", "robust_acc")
    out = {k: r.get(k) for k in keys}
    if "der" in r:
        out["der"] = r["der"]
    return out


def _counts(state: dict[str, Any], folder: StudyFolder, rows: list[dict[str, Any]],
            names: list[str]) -> dict[str, Any]:
    from abd_ray.study.search import optuna_counts

    tune_counts: dict[str, int] = {}
    for r in rows:
        tune_counts[r["status"]] = tune_counts.get(r["status"], 0) + 1
    opt = optuna_counts(str(folder), names)
    optuna_total: dict[str, int] = {}
    for c in opt.values():
        for k, v in c.items():
            optuna_total[k] = optuna_total.get(k, 0) + v
    ml: dict[str, Any] = {}
    try:
        from abd_ray.tracking import Tracker

        t = Tracker(state["tracking_uri"])
        children: dict[str, int] = {}
        for run in t.child_runs(state["mlflow_experiment_id"], state["parent_run_id"]):
            children[run["status"]] = children.get(run["status"], 0) + 1
        ml = {"parent_status": t.status(state["parent_run_id"]), "children": children,
              "tracking_uri": state["tracking_uri"], "parent_run_id": state["parent_run_id"]}
    except Exception as e:  # noqa: BLE001 - a report must still come out when the tracking server is away
        ml = {"error": f"{type(e).__name__}: {e}"}
    n_search = sum(r["kind"] == "search" for r in rows)
    n_reused = sum(bool(r.get("reused_from")) for r in rows)
    errs = folder.tracking_errors
    ml["tracking_errors"] = len(errs.read_text().splitlines()) if errs.exists() else 0
    return {"planned": state.get("planned_trials"), "tune": tune_counts, "tune_total": len(rows),
            "search_trials": n_search, "reused": n_reused, "optuna": opt, "optuna_total": optuna_total, "mlflow": ml}


# --- writing --------------------------------------------------------------------------------------------------------


def _f(v: Any, nd: int = 1) -> str:
    return f"{v:.{nd}f}" if finite(v) else "-"


def _params(p: dict[str, Any]) -> str:
    # 4 significant digits: learning rates such as 1e-4 must not print as 0.000
    return ", ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in p.items()) or "(defaults)"


def render_markdown(rep: dict[str, Any], pngs: dict[str, str] | None = None) -> str:
    """The report as Markdown (what ``abd-ray report`` prints)."""
    c = rep["counts"]
    lines = [f"# Study {rep['study']}", "",
             f"Status: {rep['status']}. Trials: planned {c['planned']}, in Tune {c['tune_total']} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(c['tune'].items())) or 'none'}); "
             f"Optuna {', '.join(f'{k} {v}' for k, v in sorted(c['optuna_total'].items())) or '-'} "
             f"(search trials {c['search_trials']}"
             + (f"; {c['reused']} answered from a finished twin, counted once" if c.get("reused") else "")
             + "); MLflow child runs "
             f"{', '.join(f'{k} {v}' for k, v in sorted(c['mlflow'].get('children', {}).items())) or '-'}"
             + (f"; {c['mlflow']['tracking_errors']} MLflow writes failed (see tracking_errors.jsonl)"
                if c["mlflow"].get("tracking_errors") else "") + ".", ""]
    if rep.get("mlflow", {}).get("experiment_url"):
        lines += ["## MLflow", "", "```", *mlflow_lines(rep["mlflow"]), "```", ""]
    lines += ["## Paper-style table (grid trials; Acc / ASR %, mean +- std (n seeds))", "",
              "| attack | synthesizer | defense | teacher acc/asr | clean_acc | asr |",
              "|---|---|---|---|---|---|"]
    for t in rep["table"]:
        lines.append(f"| {t['attack']} | {t['synthesizer']} | {t['defense']} | "
                     f"{_f(t['teacher_clean_acc'])}/{_f(t['teacher_asr'])} | {t['clean_acc_text']} | "
                     f"{t['asr_text']} |")
    lines += ["", f"## Recommended config per cell (lowest mean asr within {rep['max_acc_drop']:g} points of the "
                  "undefended clean_acc; mean +- std (n seeds))", "",
              "| cell | trial | defense | seeds | clean_acc | asr | undefended acc / asr | der | hyperparameters |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cell, r in rep["recommended"].items():
        if r is None:
            lines.append(f"| {cell} | - | - | - | - | - | - | - | no defended run within the allowed drop |")
            continue
        seeds = f"{r['n']} ({', '.join(str(s) for s in r['seeds'])})"
        lines.append(f"| {cell} | {r['trial_id']} ({r['kind']}) | {r['defense']} | {seeds} | "
                     f"{format_ms(r['clean_acc'], r['clean_acc_std'], r['n'])} | "
                     f"{format_ms(r['asr'], r['asr_std'], r['n'])} | "
                     f"{r['undefended']['clean_acc']} / {r['undefended']['asr']} | {_f(r.get('der'), 3)} | "
                     f"{_params(r['params'])} |")
    if any(r is not None and r["n"] == 1 for r in rep["recommended"].values()):
        lines += ["", "A recommendation resting on one seed is one draw: the same configuration scatters from "
                  "seed to seed (bench/RESULTS.md, spread); run it on more seeds (the study's `seeds`) before "
                  "concluding."]
    for cell, front in rep["pareto"].items():
        lines += ["", f"## Pareto front: {cell} (clean_acc max, asr min)", ""]
        if pngs and cell in pngs:
            lines += [f"![pareto {cell}]({Path(pngs[cell]).name})", ""]
        lines += ["| trial | kind | defense | seed | clean_acc | asr | robust_acc | der | hyperparameters |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in front:
            lines.append(f"| {r['trial_id']} | {r['kind']} | {r['defense']} | {r['seed']} | {_f(r['clean_acc'])} | "
                         f"{_f(r['asr'])} | {_f(r['robust_acc'])} | {_f(r.get('der'), 3)} | {_params(r['params'])} |")
    lines += search_lines(rep.get("search", {}))
    lines += ["", "## der of defended runs against their undefended twin", "",
              "| trial | kind | cell | defense | seed | clean_acc | asr | der |", "|---|---|---|---|---|---|---|---|"]
    for d in rep["der"]:
        lines.append(f"| {d['trial_id']} | {d['kind']} | {d['cell']} | {d['defense']} | {d['seed']} | "
                     f"{_f(d['clean_acc'])} | {_f(d['asr'])} | {_f(d['der'], 3)} |")
    lines += sr_effect_lines(rep.get("sr_effect", []))
    lines += _diagnostics_lines(rep["trials"])
    failed = [r for r in rep["trials"] if r["status"] not in ("TERMINATED",)]
    if failed:
        lines += ["", "## Trials that did not finish", "", "| trial | cell | defense | status | reason |",
                  "|---|---|---|---|---|"]
        for r in failed:
            lines.append(f"| {r['trial_id']} | {r['cell']} | {r['defense']} | {r['status']} | "
                         f"{(r.get('error') or '').replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def search_lines(searched: dict[str, Any]) -> list[str]:
    """Per cell, the search's trials against its warm start: which proposals reach the front, and what dominates
    the rest, so that a search that found nothing better than the defaults says so."""
    lines: list[str] = []
    for cell, s in searched.items():
        lines += ["", f"## The search against its warm start: {cell}", "", f"Verdict: {s['verdict']}.", "",
                  "| trial | origin | defense | clean_acc | asr | on the front | dominated by | hyperparameters |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["trials"]:
            lines.append(f"| {r['trial_id']} | {r['origin']} | {r['defense']} | {_f(r['clean_acc'])} | "
                         f"{_f(r['asr'])} | {'yes' if r['on_front'] else 'no'} | {r['dominated_by'] or '-'} | "
                         f"{_params(r['params'])} |")
    return lines


def sr_effect_lines(effects: list[dict[str, Any]]) -> list[str]:
    """The section that says, per cell, whether SR lowers the asr beyond what the vaccine alone does."""
    if not effects:
        return []
    lines = ["", "## Does SR earn its place? (abd against sv, grid trials paired by seed)", "",
             f"SR earns its place where abd's asr is at least {SR_ASR_GAIN:g} points below sv's at no more than "
             f"{SR_CLEAN_COST:g} points of extra clean cost (means over the paired seeds).", "",
             "| cell | seeds | asr: abd - sv | clean_acc: abd - sv | run time abd / sv | SR earns its place |",
             "|---|---|---|---|---|---|"]
    for e in effects:
        lines.append(f"| {e['cell']} | {e['n']} ({', '.join(str(s) for s in e['seeds'])}) | "
                     f"{format_ms(e['asr_delta'], e['asr_delta_std'], e['n'])} | "
                     f"{format_ms(e['clean_delta'], e['clean_delta_std'], e['n'])} | {_f(e['time_ratio'], 2)} | "
                     f"{'yes' if e['earns'] else 'no'} |")
    return lines


def _diagnostics_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The section of the defenses' probes: one row per defended trial that reported any."""
    rows = [r for r in rows if r.get("diagnostics") and not r.get("reused_from")]
    if not rows:
        return []
    keys = [k for k in DIAGNOSTICS if any(k in r["diagnostics"] for r in rows)]
    lines = ["", "## What the defense saw (last evaluation, against the real test sets)", "",
             "SV: how well the shuffled suspect tells triggered test images from clean ones, and how much of the last "
             "synthetic batch it masked. SR: how often its perturbation flips the student (and the clamp alone, at "
             "delta 0), how often the teacher and the student send clean test images plus delta to the target, and "
             "its cosine with the true trigger's change. A vaccine whose suspect detects the trigger but whose "
             "generator no longer makes suspect inputs, with the asr still high, carries the backdoor through "
             "inputs the suspect does not flag.", "",
             "| trial | cell | defense | seed | asr | " + " | ".join(DIAGNOSTICS[k] for k in keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        values = [_f(r["diagnostics"].get(k), 3 if k in ("sv_auc", "sr_trigger_cos", "sv_masked_frac") else 1)
                  for k in keys]
        lines.append(f"| {r['trial_id']} | {r['cell']} | {r['defense']} | {r['seed']} | {_f(r['asr'])} | "
                     + " | ".join(values) + " |")
    return lines


def plot_pareto(rows: list[dict[str, Any]], front: list[dict[str, Any]], cell: str, path: Path) -> None:
    """Scatter of every finished trial of a cell (clean_acc vs asr) with its Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    markers = {"none": ("x", "tab:red"), "abd": ("o", "tab:blue"), "sv": ("s", "tab:green"), "sr": ("^", "tab:purple")}
    for defense in sorted({r["defense"] for r in rows}):
        pts = [r for r in rows if r["defense"] == defense]
        mk, col = markers.get(defense, ("d", "tab:gray"))
        ax.scatter([r["asr"] for r in pts], [r["clean_acc"] for r in pts], marker=mk, color=col, label=defense,
                   alpha=0.8)
    if front:
        ax.step([r["asr"] for r in front], [r["clean_acc"] for r in front], where="post", color="black", lw=1)
        ax.scatter([r["asr"] for r in front], [r["clean_acc"] for r in front], s=140, facecolors="none",
                   edgecolors="black", label="Pareto front")
    ax.set_xlim(-3, 103)  # asr on its whole range, so fronts of different cells compare at a glance
    ax.set_xlabel("attack success rate (%)  ← better")
    ax.set_ylabel("clean accuracy (%)  ↑ better")
    ax.set_title(cell)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def write_report(study_dir: str | Path, max_acc_drop: float = 5.0) -> tuple[dict[str, Any], str]:
    """Build the report and write it into ``<study>/report/``: report.md, report.json, CSVs and Pareto PNGs.

    Returns:
        The report dict (with ``files``) and its Markdown.
    """
    rep = build_report(study_dir, max_acc_drop)
    out = StudyFolder(rep["study_dir"]).report_dir
    out.mkdir(exist_ok=True)
    pngs = {}
    done = [r for r in rep["trials"] if finite(r["clean_acc"])]
    for cell, front in rep["pareto"].items():
        png = out / f"pareto_{cell.replace('/', '_')}.png"
        plot_pareto([r for r in done if r["cell"] == cell], front, cell, png)
        pngs[cell] = str(png)
    md = render_markdown(rep, pngs)
    files = {"markdown": str(out / "report.md"), "json": str(out / "report.json"),
             "trials_csv": str(out / "trials.csv"), "pareto_csv": str(out / "pareto.csv"),
             "table_csv": str(out / "table.csv"), "der_csv": str(out / "der.csv"),
             "recommended_csv": str(out / "recommended.csv"), "pareto_png": pngs}
    rep["files"] = files
    (out / "report.md").write_text(md)
    _write_csv(out / "trials.csv", rep["trials"])
    _write_csv(out / "pareto.csv", [{"cell": c, **r} for c, f in rep["pareto"].items() for r in f])
    _write_csv(out / "table.csv", rep["table"])
    _write_csv(out / "der.csv", rep["der"])
    _write_csv(out / "recommended.csv", [{"cell": c, **r} for c, r in rep["recommended"].items() if r])
    (out / "report.json").write_text(json.dumps(jsonable(rep), indent=2, sort_keys=True))
    _log_to_parent(rep, out)
    return rep, md


def summary_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The parent run's summary: per cell, the recommended config's clean_acc / asr, the front's hypervolume and,
    in a search, how many of the sampler's proposals lie on the front."""
    out = {f"{cell}/hypervolume": hv for cell, hv in rep["hypervolume"].items()}
    for cell, r in rep["recommended"].items():
        if r is not None:
            out.update({f"{cell}/recommended_clean_acc": r["clean_acc"], f"{cell}/recommended_asr": r["asr"]})
    for cell, s in rep.get("search", {}).items():
        out[f"{cell}/proposals_on_front"] = float(s["proposals_on_front"])
    return {k: v for k, v in out.items() if finite(v)}


def _log_to_parent(rep: dict[str, Any], folder: Path) -> None:
    """The report's files as artifacts of the study's parent run, and its summary metrics (step: the finished
    trials, so a resumed study's summary grows a point per report). An unreachable database is only a warning:
    the report is written in the study folder either way."""
    import logging

    from abd_ray.tracking import Tracker

    state = StudyFolder(rep["study_dir"]).read_state()
    if not state.get("parent_run_id"):
        return
    try:
        t = Tracker(state["tracking_uri"])
        t.log_artifacts(state["parent_run_id"], folder, REPORT_DIR)
        t.log_metrics(state["parent_run_id"], summary_metrics(rep), sum(finite(r["clean_acc"]) for r in rep["trials"]))
    except Exception as e:  # noqa: BLE001 - the report is safe in the folder; MLflow is a copy
        logging.getLogger(__name__).warning("could not log the report to MLflow run %s: %s: %s",
                                            state["parent_run_id"], type(e).__name__, e)


def jsonable(obj: Any) -> Any:
    """NaN/inf become null, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
