"""The driver-side Tune callback that writes a study into MLflow.

Ray's own MLflow integrations keep no state and do not nest runs, so a restored experiment would open a second
run for a trial that was running when the driver died. This callback instead:

- finds a trial's child run by its tags (parent run id + Tune trial id) before creating one, so a restarted or
  restored trial reuses its run;
- logs an evaluation's metrics only if its step is beyond the last step the run already holds (read back from
  MLflow once per run and driver), so a trial restarted from an older checkpoint never logs a step twice;
- logs the final artifacts from the trial's last checkpoint and marks the run FINISHED (or FAILED).

A write that fails (database locked, server away) never ends the experiment: it is recorded in the study folder's
``tracking_errors.jsonl``, and :func:`replay_tracking_errors` (run by the driver when a study ends, and again by
``abd-ray resume``) logs what is missing from Tune's own records of those trials (``result.json`` and the final
checkpoint), once the database answers again. Records it could not replay stay in the file and the report counts them.

It holds only the study folder across pickling (Tune pickles callbacks into the experiment); the tracking URI,
experiment and parent run are read from the folder's ``study.json``, so ``abd-ray resume --tracking-uri`` can
point a study at a moved database.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback, CLIReporter

from abd_ray.study.diskspace import check_free_space, stopped_hint
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


def read_state(study_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(study_dir) / "study.json").read_text())


TRACKING_ERRORS = "tracking_errors.jsonl"
TRACKING_REPLAYED = "tracking_errors.replayed.jsonl"


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a Tune result: numbers, minus Tune's bookkeeping keys."""
    return {k: v for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def ensure_child(t, exp_id: str, parent: str, trial_id: str, config: dict[str, Any],
                 study_file: Path | None) -> tuple[str, bool]:
    """The child run of a trial: found by its tags, or created with its params; returns (run id, created)."""
    rid = t.find_child(exp_id, parent, trial_id)
    if rid is not None:
        return rid, False
    _, meta = split_config(config)
    rid = t.start_child(exp_id, parent, trial_id, trial_label(config, trial_id), dict(config),
                        {"abd_ray.kind": meta.get("study.kind", ""), "abd_ray.cell": meta.get("study.cell", "")})
    if study_file is not None:
        t.log_artifact(rid, study_file)
    return rid, True


# After a failed write the hooks leave MLflow alone this long, recording what they skip for the replay, so a server
# that is away costs the study's loop one failed request, not one per result.
OUTAGE_PAUSE_S = 15.0


def _guarded(hook):
    """Keep a tracking failure (database locked, server away) from ending or stalling the experiment.

    The failure is logged as a warning and appended to the study folder's ``tracking_errors.jsonl`` (nothing is
    lost silently), and for :data:`OUTAGE_PAUSE_S` the hooks only append their records; the replay at the end of the
    study (or on resume) then logs what is missing from Tune's records.
    """

    @functools.wraps(hook)
    def wrapper(self, iteration, trials, trial, *args, **info):
        step = args[0].get("step") if args and isinstance(args[0], dict) else None
        if time.monotonic() < self._paused_until:
            self._record(hook.__name__, trial.trial_id, step, "skipped: MLflow failed a moment ago")
            return None
        try:
            return hook(self, iteration, trials, trial, *args, **info)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow %s for trial %s failed: %s: %s", hook.__name__, trial.trial_id, type(e).__name__, e)
            self._record(hook.__name__, trial.trial_id, step, f"{type(e).__name__}: {e}"[:1000])
            self._tracker = None  # reconnect on the next call
            self._paused_until = time.monotonic() + OUTAGE_PAUSE_S
            return None

    return wrapper


class MLflowTrialCallback(Callback):
    """One MLflow child run per Tune trial, under the study's parent run.

    Args:
        study_dir: the study folder (holds ``study.json`` with the tracking URI and the parent run id).
    """

    def __init__(self, study_dir: str) -> None:
        self.study_dir = str(study_dir)
        self._reset()

    def _reset(self) -> None:
        self._tracker = None
        self._paused_until = 0.0
        self._exp_id: str | None = None
        self._parent: str | None = None
        self._study_file: Path | None = None
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._node: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"study_dir": self.study_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.study_dir = state["study_dir"]
        self._reset()

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _record(self, hook: str, trial_id: str, step: int | None, error: str) -> None:
        """Append a write that did not reach MLflow to ``tracking_errors.jsonl``, for the replay."""
        rec = {"time": time.time(), "hook": hook, "trial_id": trial_id, "error": error}
        if step is not None:
            rec["step"] = step
        try:
            with open(Path(self.study_dir) / TRACKING_ERRORS, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:
            pass

    def _t(self):
        if self._tracker is None:
            from abd_ray.tracking import Tracker

            st = read_state(self.study_dir)
            self._tracker = Tracker(st["tracking_uri"])
            self._exp_id = st["mlflow_experiment_id"]
            self._parent = st["parent_run_id"]
            f = Path(self.study_dir) / "study.yaml"
            self._study_file = f if f.exists() else None
        return self._tracker

    def run_id(self, trial) -> str:
        """The child run of ``trial``: remembered, found by tags, or created (with params and tags)."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        t = self._t()
        rid, created = ensure_child(t, self._exp_id, self._parent, tid, dict(trial.config), self._study_file)
        if created:
            self._last_step[rid] = -1
        self._runs[tid] = rid
        return rid

    def _last(self, rid: str) -> int:
        if rid not in self._last_step:
            steps = self._t().logged_steps(rid, SENTINEL)
            self._last_step[rid] = max(steps) if steps else -1
        return self._last_step[rid]

    # --- Tune hooks -------------------------------------------------------------------------------------------------

    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rid = self.run_id(trial)
        t = self._t()
        if t.status(rid) != "RUNNING":
            t.set_status(rid, "RUNNING")  # a restarted trial reopens its own run, never a second one

    @_guarded
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        rid = self.run_id(trial)
        t = self._t()
        step = int(result.get("step", result.get("training_iteration", 0)))
        metrics = metrics_of(result)
        node = result.get("node_id")
        if node and self._node.get(rid) != node:
            t.set_tags(rid, {"ray.node_id": node, "ray.node_ip": result.get("node_ip", "")})
            self._node[rid] = node
        if result.get("final"):
            # The final record repeats the last evaluation: log only what no evaluation logged (wall time, ...).
            have = t.metric_keys(rid)
            extra = {k: v for k, v in metrics.items() if k not in have}
            if extra:
                t.log_metrics(rid, extra, step)
            self._last_step[rid] = max(self._last(rid), step)
            return
        if step <= self._last(rid):
            return  # already logged by an earlier attempt of this trial
        t.log_metrics(rid, metrics, step)
        self._last_step[rid] = step

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rid = self.run_id(trial)
        t = self._t()
        ok = bool(trial.last_result.get("final"))
        if ok and trial.checkpoint is not None:
            try:
                with trial.checkpoint.as_directory() as d:
                    if (Path(d) / ARTIFACTS).is_dir():
                        t.log_artifacts(rid, Path(d) / ARTIFACTS)
                    if (Path(d) / FINAL_FILE).exists():
                        t.log_artifact(rid, Path(d) / FINAL_FILE)
            except Exception as e:  # noqa: BLE001 - a missing artifact must not fail the study
                log.warning("could not log the artifacts of trial %s: %s", trial.trial_id, e)
                t.set_tags(rid, {"abd_ray.artifacts_error": str(e)[:500]})
        t.set_status(rid, "FINISHED" if ok else "FAILED")

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rid = self.run_id(trial)
        t = self._t()
        reason = ""
        err = getattr(trial, "error_file", None) or ""
        try:
            if err and Path(err).exists():
                reason = Path(err).read_text()[-2000:]
        except OSError:
            pass
        t.set_tags(rid, {"abd_ray.error": reason or "trial failed (see Tune's error file)"})
        t.set_status(rid, "FAILED")


# --- replay ---------------------------------------------------------------------------------------------------------


def _results(trial_path: str) -> list[dict[str, Any]]:
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


def sync_trial(t, exp_id: str, parent: str, study_file: Path | None, trial: dict[str, Any]) -> int:
    """Bring one trial's MLflow run in line with Tune's records; returns how many metric steps were logged.

    Idempotent: steps the run holds are skipped, artifacts already there are not logged again.
    """
    rid, _ = ensure_child(t, exp_id, parent, trial["trial_id"], trial["config"], study_file)
    have = set(t.logged_steps(rid, SENTINEL))
    logged = 0
    final = None
    for r in _results(trial["path"]):
        if r.get("final"):
            final = r
            continue
        step = int(r.get("step", r.get("training_iteration", 0)))
        if step in have:
            continue
        t.log_metrics(rid, metrics_of(r), step)
        have.add(step)
        logged += 1
    if final is not None:
        keys = t.metric_keys(rid)
        extra = {k: v for k, v in metrics_of(final).items() if k not in keys}
        if extra:
            t.log_metrics(rid, extra, int(final.get("step", 0)))
    if trial["status"] == "TERMINATED" and final is not None:
        arts = set(t.artifacts(rid))
        for ck in sorted(Path(trial["path"]).glob("checkpoint_*"), reverse=True):
            if (ck / FINAL_FILE).exists():
                if (ck / ARTIFACTS).is_dir() and not any(a.startswith("student") for a in arts):
                    t.log_artifacts(rid, ck / ARTIFACTS)
                if FINAL_FILE not in arts:
                    t.log_artifact(rid, ck / FINAL_FILE)
                break
        if t.status(rid) != "FINISHED":
            t.set_status(rid, "FINISHED")
    elif trial["status"] == "ERROR":
        t.set_tags(rid, {"abd_ray.error": trial.get("error") or "trial failed (see Tune's error file)"})
        if t.status(rid) != "FAILED":
            t.set_status(rid, "FAILED")
    return logged


def replay_tracking_errors(study_dir: str | Path, trials: list[dict[str, Any]]) -> dict[str, int]:
    """Log into MLflow what the callback could not, from Tune's records of the trials its failures touched.

    Returns:
        ``{"replayed": records resolved, "pending": records still failing, "steps": metric steps logged}``.
        Resolved records move to ``tracking_errors.replayed.jsonl``; pending ones stay in ``tracking_errors.jsonl``.
    """
    from abd_ray.tracking import Tracker

    study_dir = Path(study_dir)
    errs = study_dir / TRACKING_ERRORS
    if not errs.exists():
        return {"replayed": 0, "pending": 0, "steps": 0}
    records = [json.loads(x) for x in errs.read_text().splitlines() if x.strip()]
    if not records:
        errs.unlink()
        return {"replayed": 0, "pending": 0, "steps": 0}
    st = read_state(study_dir)
    by_id = {tr["trial_id"]: tr for tr in trials}
    f = study_dir / "study.yaml"
    study_file = f if f.exists() else None
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
    with open(study_dir / TRACKING_REPLAYED, "a") as out:
        for r in records:
            out.write(json.dumps({**r, "replayed": time.time()}) + "\n")
    errs.unlink()
    return {"replayed": len(records), "pending": 0, "steps": steps}


# --- console --------------------------------------------------------------------------------------------------------


class StudyReporter(CLIReporter):
    """Tune's progress table for a study: trials named by what they are, with their cell, defense, searched
    hyperparameters, clean_acc, asr and step.

    A table is printed soon after a trial starts or ends, else every ``max_report_frequency`` seconds (Tune's own
    reporter prints on a timer only). Tune's lines about its scheduler and its driver-side log folder are left out:
    the study's results are in the study folder.
    """

    SETTLE_S = 2.0  # trials that start or end together get one table, not one each

    def __init__(self, params: list[str], max_report_frequency: int = 30) -> None:
        super().__init__(
            metric_columns={"clean_acc": "clean_acc", "asr": "asr", "step": "step"},
            parameter_columns={"study.cell": "cell", "defense": "defense", **{f"defense.{p}": p for p in params}},
            max_report_frequency=max_report_frequency,
            max_column_length=24,
        )
        self._statuses: tuple = ()
        self._changed = False

    def should_report(self, trials: list, done: bool = False) -> bool:
        statuses = tuple((t.trial_id, t.status) for t in trials)
        if statuses != self._statuses:
            self._statuses, self._changed = statuses, True
        if self._changed and time.time() - self._last_report_time >= self.SETTLE_S or done:
            self._changed = False
            self._last_report_time = time.time()
            return True
        return super().should_report(trials, done)

    def _print(self, msg: str) -> None:
        super()._print("\n".join(x for x in msg.splitlines() if not x.startswith(("Result logdir", "Using FIFO"))))


# --- free space -----------------------------------------------------------------------------------------------------

CHECK_EVERY_STEPS = 10  # Tune steps last about 0.1 s: a statvfs a second


class FreeSpaceGuard(Callback):
    """A Tune callback that stops the experiment (raising :class:`StorageFull`) before the disk is full.

    Args:
        paths: local folders the study writes (the study folder, a local Tune storage).
        study_dir: the study folder, for the resume command in the message.
        need_mb: the free space to keep, in MiB.
    """

    def __init__(self, paths: list[str], study_dir: str, need_mb: float) -> None:
        self.paths, self.study_dir, self.need_mb = list(paths), str(study_dir), float(need_mb)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if iteration % CHECK_EVERY_STEPS == 0:
            check_free_space(self.paths, self.need_mb, stopped_hint(self.study_dir))
