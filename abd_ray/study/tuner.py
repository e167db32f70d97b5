"""The Tune experiment of a study: its plan of trials, the Tuner (new or restored), and its trials read back.

One Tune experiment runs a whole study. Restore-or-new is decided by ``Tuner.can_restore`` on the experiment path;
a fresh experiment first removes any Optuna study of the same cells, so it never appends to the studies of an
attempt that Tune could not restore.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abd_ray.study.folder import EXPERIMENT, StudyFolder, experiment_path
from abd_ray.study.spec import StudySpec, cell_key

TERMINAL = ("TERMINATED", "ERROR")

log = logging.getLogger(__name__)


def plan(spec: StudySpec, state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The fixed trials' configs and, per search cell, the constants of its search trials, each with the teacher
    that the teacher stage made for its attack."""
    teachers = state["teachers"]

    def finish(flat: dict[str, Any]) -> dict[str, Any]:
        flat["teacher_file"] = teachers[flat["attack.name"]]["path"]
        flat["cache_dir"] = state["cache_dir"]
        flat["data_root"] = state.get("data_root")
        return flat

    return [finish(c) for c in spec.grid_configs()], {c: finish(f) for c, f in spec.search_constants().items()}


def optuna_names(spec: StudySpec) -> list[str]:
    """Every Optuna study of a study: one per search cell, and one ``grid`` study per cell with fixed trials."""
    from abd_ray.study.search import grid_study_name, optuna_study_name

    names = [optuna_study_name(spec.name, cell_key(a, s)) for a, s in spec.search_cells()]
    names += [grid_study_name(spec.name, c) for c in sorted({c["study.cell"] for c in spec.grid_configs()})]
    return names


def _trainable(spec: StudySpec):
    import ray
    from ray import tune

    from abd_ray.study.trainable import train_trial

    gpu = spec.gpu
    if gpu > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        log.warning("resources.gpu=%s but the cluster has no GPU: trials run on CPU", gpu)
        gpu = 0
    return tune.with_resources(train_trial, {"cpu": spec.cpu, "gpu": gpu})


def make_tuner(spec: StudySpec, state: dict[str, Any], folder: StudyFolder, echo: Callable[[str], None]):
    """The study's Tuner: the experiment restored where Tune can, else a new one over the plan."""
    from ray import tune

    from abd_ray.study.callbacks import FreeSpaceGuard, MLflowTrialCallback, StudyReporter
    from abd_ray.study.cluster import VERBOSE_ENV
    from abd_ray.study.diskspace import min_free_mb
    from abd_ray.study.search import StudySearcher, cell_searchers, delete_studies
    from abd_ray.study.trainable import trial_dirname, trial_name

    # Ray's default console output ignores a progress reporter and prints a TensorBoard hint that does not apply
    # here: the study's own table unless `-v` asks for Ray's output (read by Tune when the experiment starts).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1" if os.environ.get(VERBOSE_ENV) == "1" else "0")
    trainable = _trainable(spec)
    path = experiment_path(state)
    if tune.Tuner.can_restore(path):
        echo(f"restoring the Tune experiment {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    fixed, cells = plan(spec, state)
    delete_studies(str(folder), optuna_names(spec))
    searchers = cell_searchers(spec, str(folder), cells) if cells else {}
    searcher = StudySearcher(fixed, searchers, spec.search.num_samples if spec.search else 0, spec.name,
                             str(folder), reuse_store=state.get("reuse_store"),
                             device="cuda" if spec.gpu > 0 else "cpu")
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=state["planned_trials"],
            # Required with a custom searcher: without it Tune keeps a single trial pending at a time.
            max_concurrent_trials=spec.max_concurrent,
            # A finished trial's worker process (torch and the engine imported, the dataset loaded) runs the next
            # trial of the same resources, instead of a fresh process per trial.
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=state["storage"],
            callbacks=[MLflowTrialCallback(str(folder)),
                       FreeSpaceGuard(folder.local_paths(state["storage"]), str(folder), min_free_mb())],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=StudyReporter([p.key for p in spec.search.space] if spec.search else []),
            verbose=1,
        ),
    )


def _error_of(trial) -> str:
    """The last line of a failed trial's error file, read from the trial's folder in storage.

    Not ``trial.error_file``: that points into the driver's Ray session folder and raises once Ray is shut down
    (a report written after the study, or by ``abd-ray report``).
    """
    try:
        name = trial.run_metadata.error_filename or "error.txt"
    except Exception:  # noqa: BLE001 - older experiment states: Tune's default name
        name = "error.txt"
    for f in dict.fromkeys([Path(trial.path) / name, Path(trial.path) / "error.txt"]):
        try:
            lines = [x for x in f.read_text().strip().splitlines() if x.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1].strip()
    return "error (no error file in the trial folder)"


def can_restore(path: str) -> bool:
    """Whether ``path`` holds a Tune experiment that Tune can restore."""
    from ray import tune

    return tune.Tuner.can_restore(path)


def tune_trials(path: str) -> list[dict[str, Any]]:
    """Every trial of a Tune experiment: id, status, config, last result, error (read without Ray running)."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(path)
    out = []
    for t in ea.trials:
        err = None
        if t.status == "ERROR":
            err = _error_of(t)
        out.append({"trial_id": t.trial_id, "status": t.status, "config": dict(t.config),
                    "last_result": dict(t.last_result or {}), "error": err, "path": t.path,
                    "num_failures": int(getattr(t, "num_failures", 0) or 0)})
    return out


def study_trials(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials of a study's experiment (none if Tune has not saved one yet)."""
    path = experiment_path(state)
    return tune_trials(path) if can_restore(path) else []
