"""One idempotent trial-to-MLflow sync: what keeps exactly one MLflow child run per Tune trial.

The live callback (:mod:`abd_ray.study.callbacks`), the replay of failed writes and the reconciliation after a study
stops all go through these functions: a trial's run is found by its tags before one is created, a metric step the
run holds is not logged again, the final record adds only the metrics no evaluation logged, the final artifacts
are logged once, and a run's status follows its trial's (:func:`run_status`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from abd_ray.study.folder import StudyFolder
from abd_ray.study.spec import split_config
from abd_ray.study.trainable import ARTIFACTS, FINAL_FILE, trial_label

log = logging.getLogger(__name__)

# Keys Tune adds to every result; they are bookkeeping, not metrics of the run.
TUNE_KEYS = {
    "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s", "pid",
    "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
    "experiment_tag", "should_checkpoint", "step", "final", "node_id", "episodes_total", "timesteps_total",
    "timesteps_since_restore", "episode_reward_mean", "warmup_time",
}
SENTINEL = "clean_acc"  # reported at every evaluation: its history tells which steps a run already holds
NO_REASON = "trial failed (see Tune's error file)"


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a Tune result: numbers, minus Tune's bookkeeping keys."""
    return {k: v for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def result_step(result: dict[str, Any]) -> int:
    """The distillation step of a Tune result."""
    return int(result.get("step", result.get("training_iteration", 0)))


def run_status(tune_status: str, final: Any) -> str:
    """The MLflow status of a trial's run: FINISHED for a trial that ended with its final record, FAILED for one
    that errored (or ended without it), KILLED for one that has not ended."""
    want = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(tune_status, "KILLED")
    return "FAILED" if want == "FINISHED" and not final else want


def ensure_child(t, exp_id: str, parent: str, trial_id: str, config: dict[str, Any],
                 study_file: Path | None) -> tuple[str, bool]:
    """The child run of a trial: found by its tags, or created with its params; returns (run id, created)."""
    rid = t.find_child(exp_id, parent, trial_id)
    if rid is not None:
        return rid, False
    _, meta = split_config(config)
    tags = {"abd_ray.kind": meta.get("study.kind", ""), "abd_ray.cell": meta.get("study.cell", "")}
    if meta.get("study.reused_from"):
        tags["abd_ray.reused_from"] = meta["study.reused_from"]  # the source's result is logged as this run's
    params = {k: v for k, v in config.items() if k != "study.reused_result"}
    rid = t.start_child(exp_id, parent, trial_id, trial_label(config, trial_id), params, tags)
    if study_file is not None:
        t.log_artifact(rid, study_file)
    return rid, True


def log_final_metrics(t, rid: str, final: dict[str, Any]) -> None:
    """The final record repeats the last evaluation: log only what no evaluation logged (wall time, ...)."""
    have = t.metric_keys(rid)
    extra = {k: v for k, v in metrics_of(final).items() if k not in have}
    if extra:
        t.log_metrics(rid, extra, result_step(final))


def log_final_artifacts(t, rid: str, checkpoint_dir: Path) -> None:
    """The artifacts of a trial's final checkpoint (samples, trigger, student, final record), unless the run
    already holds them."""
    arts = set(t.artifacts(rid))
    if (checkpoint_dir / ARTIFACTS).is_dir() and not any(a.startswith("student") for a in arts):
        t.log_artifacts(rid, checkpoint_dir / ARTIFACTS)
    if (checkpoint_dir / FINAL_FILE).exists() and FINAL_FILE not in arts:
        t.log_artifact(rid, checkpoint_dir / FINAL_FILE)


def finish_run(t, rid: str, status: str, error: str | None = None) -> None:
    """Give a run its status (and the reason of a failure), if it does not have it yet."""
    if error is not None:
        t.set_tags(rid, {"abd_ray.error": error})
    if t.status(rid) != status:
        t.set_status(rid, status)


def read_results(trial_path: str | Path) -> list[dict[str, Any]]:
    """The results a trial has reported (its ``result.json`` lines), without a line cut short."""
    f = Path(trial_path) / "result.json"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a killed driver
    return out


def _final_checkpoint(trial_path: str) -> Path | None:
    for ck in sorted(Path(trial_path).glob("checkpoint_*"), reverse=True):
        if (ck / FINAL_FILE).exists():
            return ck
    return None


def sync_trial(t, exp_id: str, parent: str, study_file: Path | None, trial: dict[str, Any]) -> int:
    """Bring one trial's MLflow run in line with Tune's records of it; returns how many metric steps were logged.

    Args:
        trial: one entry of :func:`abd_ray.study.tuner.tune_trials`.
    """
    rid, _ = ensure_child(t, exp_id, parent, trial["trial_id"], trial["config"], study_file)
    have = set(t.logged_steps(rid, SENTINEL))
    logged = 0
    final = None
    for r in read_results(trial["path"]):
        if r.get("final"):
            final = r
            continue
        step = result_step(r)
        if step in have:
            continue
        t.log_metrics(rid, metrics_of(r), step)
        have.add(step)
        logged += 1
    if final is not None:
        log_final_metrics(t, rid, final)
    if trial["status"] == "TERMINATED" and final is not None:
        ck = _final_checkpoint(trial["path"])
        if ck is not None:
            log_final_artifacts(t, rid, ck)
        finish_run(t, rid, run_status("TERMINATED", final))
    elif trial["status"] == "ERROR":
        finish_run(t, rid, run_status("ERROR", None), error=trial.get("error") or NO_REASON)
    return logged


def replay_tracking_errors(study_dir: str | Path, trials: list[dict[str, Any]]) -> dict[str, int]:
    """Log into MLflow what the callback could not, from Tune's records of the trials its failures touched.

    Returns:
        ``{"replayed": records resolved, "pending": records still failing, "steps": metric steps logged}``.
        Resolved records move to ``tracking_errors.replayed.jsonl``; pending ones stay in ``tracking_errors.jsonl``.
    """
    from abd_ray.tracking import Tracker

    folder = StudyFolder(study_dir)
    errs = folder.tracking_errors
    if not errs.exists():
        return {"replayed": 0, "pending": 0, "steps": 0}
    records = [json.loads(x) for x in errs.read_text().splitlines() if x.strip()]
    if not records:
        errs.unlink()
        return {"replayed": 0, "pending": 0, "steps": 0}
    st = folder.read_state()
    by_id = {tr["trial_id"]: tr for tr in trials}
    study_file = folder.study_file()
    steps = 0
    try:
        t = Tracker(st["tracking_uri"])
        for tid in dict.fromkeys(r["trial_id"] for r in records):
            if tid in by_id:
                steps += sync_trial(t, st["mlflow_experiment_id"], st["parent_run_id"], study_file, by_id[tid])
    except Exception as e:  # noqa: BLE001 - still unreachable: keep the records for the next attempt
        log.warning("MLflow still unreachable (%s: %s); %d tracking records kept in %s", type(e).__name__, e,
                    len(records), errs)
        return {"replayed": 0, "pending": len(records), "steps": steps}
    with open(folder.tracking_replayed, "a") as out:
        for r in records:
            out.write(json.dumps({**r, "replayed": time.time()}) + "\n")
    errs.unlink()
    return {"replayed": len(records), "pending": 0, "steps": steps}
