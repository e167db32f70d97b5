"""The study's MLflow parent run, and the agreement of Tune, Optuna and MLflow once the experiment stops.

A SIGKILLed driver leaves trials RUNNING in Optuna and in MLflow, and a restored experiment may have opened runs
for trials Tune no longer knows. After every attempt the driver replays the MLflow writes that failed and
reconciles, so a finished study has exactly one FINISHED (or FAILED) child run per Tune trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from abd_ray.study.folder import StudyFolder
from abd_ray.study.spec import StudySpec
from abd_ray.study.tuner import optuna_names

log = logging.getLogger(__name__)


def start_tracking(spec: StudySpec, state: dict[str, Any], folder: StudyFolder) -> None:
    """The study's MLflow experiment and parent run: created on the first attempt, reopened on a resume."""
    from abd_ray.tracking import Tracker

    t = Tracker(state["tracking_uri"])
    exp_id = t.experiment(spec.name)
    state["mlflow_experiment_id"] = exp_id
    if not state.get("parent_run_id"):
        params = {"study.name": spec.name, "study.mode": spec.mode, "study.dataset": spec.dataset,
                  "study.attacks": ",".join(spec.attacks), "study.synthesizers": ",".join(spec.synthesizers),
                  "study.defenses": ",".join(spec.defenses), "study.seeds": ",".join(map(str, spec.seeds)),
                  "study.planned_trials": state["planned_trials"], "study.smoke": state.get("smoke", False),
                  "study.budget": json.dumps(spec.budget, sort_keys=True)}
        if spec.search is not None:
            params.update({"search.defense": spec.search.defense, "search.sampler": spec.search.sampler,
                           "search.num_samples": spec.search.num_samples,
                           "search.space": json.dumps({p.name: p.to_dict() for p in spec.search.space})})
        state["parent_run_id"] = t.start_parent(exp_id, spec.name, params, {"abd_ray.study_dir": str(folder)})
        t.log_artifact(state["parent_run_id"], folder.spec_copy)
    elif t.status(state["parent_run_id"]) != "RUNNING":
        t.set_status(state["parent_run_id"], "RUNNING")
    folder.write_state(state)


def reconcile(spec: StudySpec, state: dict[str, Any], folder: StudyFolder, trials: list[dict[str, Any]],
              finished: bool) -> dict[str, int]:
    """Make MLflow and Optuna agree with Tune once the experiment has stopped.

    - finished: Optuna trials still RUNNING (asked by a killed driver, never saved by Tune) become FAIL; MLflow
      child runs of trials Tune does not know become KILLED and are deleted; each trial's run gets the status of
      :func:`abd_ray.study.sync.run_status`; the parent run is FINISHED.
    - interrupted: runs of unfinished trials and the parent become KILLED, until ``abd-ray resume`` reopens them.
    """
    from abd_ray.study.search import close_orphans, record_errors
    from abd_ray.study.sync import run_status
    from abd_ray.tracking import ORPHAN_TAG, Tracker

    t = Tracker(state["tracking_uri"])
    by_id = {tr["trial_id"]: tr for tr in trials}
    fixes = {"optuna_orphans": 0, "mlflow_orphans": 0, "mlflow_fixed": 0}
    seen: set[str] = set()
    for run in t.child_runs(state["mlflow_experiment_id"], state["parent_run_id"]):
        tr = by_id.get(run["trial_id"])
        if tr is None or run["trial_id"] in seen:
            if finished:
                t.set_tags(run["run_id"], {ORPHAN_TAG: "true"})
                t.set_status(run["run_id"], "KILLED")
                t.delete(run["run_id"])
                fixes["mlflow_orphans"] += 1
            continue
        seen.add(run["trial_id"])
        want = run_status(tr["status"], tr["last_result"].get("final"))
        if run["status"] != want and (finished or run["status"] == "RUNNING"):
            t.set_status(run["run_id"], want)
            fixes["mlflow_fixed"] += 1
    if finished:
        fixes["optuna_orphans"] = close_orphans(str(folder), optuna_names(spec))
        errors = {tr["trial_id"]: tr["error"] or "error" for tr in trials if tr["status"] == "ERROR"}
        fixes["optuna_errors"] = record_errors(str(folder), optuna_names(spec), errors)
    t.set_status(state["parent_run_id"], "FINISHED" if finished else "KILLED")
    return fixes


def finish_tracking(spec: StudySpec, state: dict[str, Any], folder: StudyFolder, trials: list[dict[str, Any]],
                    finished: bool, echo: Callable[[str], None], now: str) -> None:
    """Replay failed MLflow writes, then reconcile; an unreachable database is reported, never fatal."""
    from abd_ray.study.sync import replay_tracking_errors

    rep = replay_tracking_errors(folder.path, trials)
    if rep["replayed"]:
        echo(f"MLflow: {rep['replayed']} failed tracking write(s) replayed from Tune's records "
             f"({rep['steps']} metric step(s) logged late)")
    try:
        state["reconciled"] = reconcile(spec, state, folder, trials, finished)
    except Exception as e:  # noqa: BLE001 - the trials' results are safe in Tune's files; MLflow can catch up
        log.warning("MLflow reconciliation failed: %s: %s", type(e).__name__, e)
        rep["pending"] = rep["pending"] or 1
        with open(folder.tracking_errors, "a") as f:
            f.write(json.dumps({"time": now, "hook": "reconcile", "trial_id": None,
                                "error": f"{type(e).__name__}: {e}"[:1000]}) + "\n")
    state["tracking"] = rep
    if rep["pending"]:
        from abd_ray.tracking import redact

        echo(f"MLflow at {redact(state['tracking_uri'])} could not be written ({rep['pending']} record(s) in "
             f"{folder.tracking_errors}); the results are safe in Tune's files: run `abd-ray resume "
             f"{folder}` when the tracking database is reachable again to log them")
