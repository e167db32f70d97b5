"""Where a study stands, read from its folder without starting Ray (``abd-ray status``).

Safe beside a running driver: every source is only read. ``study.json`` gives the plan and the tracking URI;
Tune's experiment snapshot (``tune/experiment_state-*.json``, plain JSON) the trials Tune knows and their status
at its last save; the trials' ``result.json`` their latest step; ``optuna.db`` (opened read-only) the trials that
ended since, with their objective values; the folder's lock whether a driver runs the study; MLflow the child
runs by status.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from abd_ray.study.folder import StudyFolder
from abd_ray.study.front import finite, hypervolume, pareto_front, recommend


def tune_snapshot(folder: StudyFolder) -> dict[str, dict[str, Any]]:
    """Trial id -> name, status, config, last result and folder, from Tune's latest experiment snapshot."""
    exp = folder.local_experiment
    states = sorted(exp.glob("experiment_state-*.json")) if exp.is_dir() else []
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, ValueError):  # being replaced by the driver: the previous look is as good
        data = json.loads(states[-2].read_text()) if len(states) > 1 else {"trial_data": []}
    out = {}
    for entry in data.get("trial_data", []):
        t, meta = json.loads(entry[0]), json.loads(entry[1])
        config = t.get("config") if isinstance(t.get("config"), dict) else {}
        out[t["trial_id"]] = {"trial_id": t["trial_id"], "name": t.get("custom_trial_name") or t["trial_id"],
                              "status": t.get("status"), "config": config,
                              "last_result": meta.get("last_result") or {},
                              "folder": str(exp / (t.get("relative_logdir") or ""))}
    return out


def _last_result(folder: str) -> dict[str, Any]:
    f = Path(folder) / "result.json"
    try:
        with open(f, "rb") as fh:
            fh.seek(max(0, f.stat().st_size - 65536))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a line being written
    return {}


def optuna_trials(folder: StudyFolder, study: str, search_defense: str | None) -> list[dict[str, Any]]:
    """The finished and failed trials of the study's Optuna studies (``optuna.db`` opened read-only)."""
    db = folder.optuna_db
    if not db.exists():
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///file:{db}?mode=ro&uri=true", skip_table_creation=True,
                                         skip_compatibility_check=True)
    out = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        name = summary.study_name
        if not name.startswith(f"{study}:"):
            continue
        cell = name[len(study) + 1:].removesuffix(":grid")
        grid = name.endswith(":grid")
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            if t.state.name not in ("COMPLETE", "FAIL"):
                continue
            values = t.values or [float("nan"), float("nan")]
            params = {k.split(".", 1)[1]: v for k, v in t.params.items() if k.startswith("defense.")}
            out.append({"trial_id": t.user_attrs.get("tune_trial_id"), "state": t.state.name, "cell": cell,
                        "kind": "grid" if grid else "search",
                        "defense": t.params.get("defense") if grid else search_defense,
                        "seed": t.params.get("seed"), "params": params,
                        "clean_acc": values[0], "asr": values[1]})
    return out


def study_status(study_dir: str | os.PathLike, max_acc_drop: float = 5.0, mlflow: bool = True) -> dict[str, Any]:
    """Everything ``abd-ray status`` shows, as one JSON-able dict."""
    folder = StudyFolder(study_dir)
    state = folder.read_state()
    pid = folder.driver_pid()
    tune = tune_snapshot(folder)
    search_defense = _search_defense(folder)
    ended = {t["trial_id"]: t for t in optuna_trials(folder, state["name"], search_defense) if t["trial_id"]}
    trials = []
    for tid, t in tune.items():
        status = t["status"]
        if tid in ended:
            status = "TERMINATED" if ended[tid]["state"] == "COMPLETE" else "ERROR"
        elif status == "RUNNING" and pid is None:
            status = "INTERRUPTED"  # the driver is gone: `abd-ray resume` restarts it from its checkpoint
        last = _last_result(t["folder"]) if status not in ("TERMINATED", "ERROR") else {}
        trials.append({"trial_id": tid, "name": t["name"], "status": status,
                       "step": last.get("step", t["last_result"].get("step")),
                       "clean_acc": last.get("clean_acc", t["last_result"].get("clean_acc")),
                       "asr": last.get("asr", t["last_result"].get("asr"))})
    # Trials Optuna saw end after Tune's last snapshot (not in it yet).
    for tid, e in ended.items():
        if tid not in tune:
            trials.append({"trial_id": tid, "name": tid, "status": "TERMINATED" if e["state"] == "COMPLETE"
                           else "ERROR", "step": None, "clean_acc": e["clean_acc"], "asr": e["asr"]})
    by = {s: sum(t["status"] == s for t in trials) for s in ("TERMINATED", "ERROR", "RUNNING", "INTERRUPTED")}
    planned = int(state.get("planned_trials") or 0)
    counts = {"planned": planned, "finished": by["TERMINATED"], "failed": by["ERROR"], "running": by["RUNNING"],
              "interrupted": by["INTERRUPTED"]}
    counts["pending"] = max(0, planned - sum(counts[k] for k in ("finished", "failed", "running", "interrupted")))

    best = {}
    done = [e for e in ended.values() if e["state"] == "COMPLETE" and finite(e["clean_acc"])]
    for cell in sorted({e["cell"] for e in done}):
        rows = [e for e in done if e["cell"] == cell]
        base = [e for e in rows if e["defense"] == "none"]
        acc0 = sum(e["clean_acc"] for e in base) / len(base) if base else float("nan")
        rec = recommend(rows, acc0, max_acc_drop)
        front = pareto_front(rows)
        best[cell] = {"recommended": rec, "undefended_clean_acc": acc0, "front_size": len(front),
                      "hypervolume": hypervolume([(r["clean_acc"], r["asr"]) for r in front])}

    status = state.get("status")
    if status == "running" and pid is None:
        status = "interrupted"  # its driver died before it could say so
    out = {"study": state["name"], "study_dir": str(folder), "status": status,
           "attempts": state.get("attempts"), "updated": state.get("updated"), "driver_pid": pid,
           "counts": counts, "trials": sorted(trials, key=lambda t: t["name"]), "best": best,
           "max_acc_drop": max_acc_drop,
           "resume": None if pid is not None or state.get("status") == "finished"
           else f"abd-ray resume {folder}"}
    if mlflow:
        out["mlflow"] = _mlflow(state)
    return out


def _search_defense(folder: StudyFolder) -> str | None:
    """The searched defense, read from the study file's YAML: validating it would load every registry (torch)."""
    import yaml

    try:
        return ((yaml.safe_load(folder.spec_copy.read_text()) or {}).get("search") or {}).get("defense")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _mlflow(state: dict[str, Any]) -> dict[str, Any]:
    """Child runs by status and the UI links; a tracking server that does not answer within seconds is reported."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from abd_ray.tracking import Tracker, ui_links

    out = ui_links(state["tracking_uri"], state.get("mlflow_experiment_id"), state.get("parent_run_id"))
    if not state.get("parent_run_id"):
        return out
    try:
        children: dict[str, int] = {}
        for run in Tracker(state["tracking_uri"]).child_runs(state["mlflow_experiment_id"], state["parent_run_id"]):
            children[run["status"]] = children.get(run["status"], 0) + 1
        out["children"] = children
    except Exception as e:  # noqa: BLE001 - status must answer while the tracking server is away
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def render_status(st: dict[str, Any]) -> str:
    """The status as a few lines of text."""
    from abd_ray.study.report import _f, _params, mlflow_lines

    c = st["counts"]
    driver = (f"a driver is running it (pid {st['driver_pid']})" if st["driver_pid"] is not None
              else "no driver is running it")
    lines = [f"study {st['study']}: {st['status']}, {driver}; folder {st['study_dir']}",
             f"trials: planned {c['planned']}, finished {c['finished']}, failed {c['failed']}, running {c['running']}"
             + (f", interrupted {c['interrupted']}" if c["interrupted"] else "") + f", pending {c['pending']}"]
    for t in st["trials"]:
        if t["status"] in ("RUNNING", "INTERRUPTED", "PENDING", "PAUSED"):
            lines.append(f"  {t['status'].lower():<11} {t['name']}  step {t['step'] if t['step'] is not None else '-'}"
                         f"  clean_acc {_f(t['clean_acc'])}  asr {_f(t['asr'])}")
    for cell, b in st["best"].items():
        r = b["recommended"]
        best = (f"{r['defense']} {_params(r['params'])}: clean_acc {_f(r['clean_acc'])}, asr {_f(r['asr'])}"
                if r else f"no defended run within {st['max_acc_drop']:g} points of the undefended clean_acc")
        lines.append(f"best so far in {cell}: {best} (undefended clean_acc {_f(b['undefended_clean_acc'])}; "
                     f"front of {b['front_size']}, hypervolume {b['hypervolume']:.0f})")
    ml = st.get("mlflow") or {}
    if ml.get("children") is not None:
        lines.append("MLflow child runs: " + (", ".join(f"{k} {v}" for k, v in sorted(ml["children"].items()))
                                              or "none yet"))
    elif ml.get("error"):
        lines.append(f"MLflow: not readable ({ml['error']})")
    lines += mlflow_lines(ml)
    if st["resume"]:
        lines.append(f"continue it with: {st['resume']}")
    return "\n".join(lines)
