"""The driver-side Tune callbacks of a study: MLflow child runs, the progress table, the free-space guard.

Ray's own MLflow integrations keep no state and do not nest runs, so a restored experiment would open a second
run for a trial that was running when the driver died. :class:`MLflowTrialCallback` instead goes through the
idempotent sync of :mod:`abd_ray.study.sync`: it finds a trial's child run by its tags before creating one, logs an
evaluation only if its step is beyond the last step the run holds (read back from MLflow once per run and driver),
and logs the final artifacts from the trial's last checkpoint.

A write that fails (database locked, server away) never ends the experiment: it is recorded in the study folder's
``tracking_errors.jsonl``, and :func:`abd_ray.study.sync.replay_tracking_errors` (run by the driver when a study
ends, and again by ``abd-ray resume``) logs what is missing from Tune's own records once the database answers.

The callback holds only the study folder across pickling (Tune pickles callbacks into the experiment); the tracking
URI, experiment and parent run are read from the folder's ``study.json``, so ``abd-ray resume --tracking-uri`` can
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
from abd_ray.study.folder import StudyFolder
from abd_ray.study.sync import (
    NO_REASON,
    SENTINEL,
    ensure_child,
    finish_run,
    log_final_artifacts,
    log_final_metrics,
    metrics_of,
    result_step,
    run_status,
)

log = logging.getLogger(__name__)


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
            with open(StudyFolder(self.study_dir).tracking_errors, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:
            pass

    def _t(self):
        if self._tracker is None:
            from abd_ray.tracking import Tracker

            folder = StudyFolder(self.study_dir)
            st = folder.read_state()
            self._tracker = Tracker(st["tracking_uri"])
            self._exp_id = st["mlflow_experiment_id"]
            self._parent = st["parent_run_id"]
            self._study_file = folder.study_file()
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
        step = result_step(result)
        node = result.get("node_id")
        if node and self._node.get(rid) != node:
            t.set_tags(rid, {"ray.node_id": node, "ray.node_ip": result.get("node_ip", "")})
            self._node[rid] = node
        if result.get("final"):
            log_final_metrics(t, rid, result)
            self._last_step[rid] = max(self._last(rid), step)
            return
        if step <= self._last(rid):
            return  # already logged by an earlier attempt of this trial
        t.log_metrics(rid, metrics_of(result), step)
        self._last_step[rid] = step

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rid = self.run_id(trial)
        t = self._t()
        ok = bool(trial.last_result.get("final"))
        if ok and trial.checkpoint is not None:
            try:
                with trial.checkpoint.as_directory() as d:
                    log_final_artifacts(t, rid, Path(d))
            except Exception as e:  # noqa: BLE001 - a missing artifact must not fail the study
                log.warning("could not log the artifacts of trial %s: %s", trial.trial_id, e)
                t.set_tags(rid, {"abd_ray.artifacts_error": str(e)[:500]})
        finish_run(t, rid, run_status("TERMINATED", ok))

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
        finish_run(t, rid, run_status("ERROR", None), error=reason or NO_REASON)


# --- console --------------------------------------------------------------------------------------------------------


class StudyReporter(CLIReporter):
    """Tune's progress table for a study: trials named by what they are, with their cell, defense, searched
    hyperparameters, clean_acc, asr and step.

    A table is printed soon after a trial starts or ends, else every ``max_report_frequency`` seconds (Tune's own
    reporter prints on a timer only). Tune's lines about its scheduler and its driver-side log folder are left out:
    the study's results are in the study folder.

    Args:
        params: the searched parameters' config keys (``defense.coef``; a switch's ``study.sr``).
        max_report_frequency: seconds between tables while nothing starts or ends.
    """

    SETTLE_S = 2.0  # trials that start or end together get one table, not one each

    def __init__(self, params: list[str], max_report_frequency: int = 30) -> None:
        super().__init__(
            metric_columns={"clean_acc": "clean_acc", "asr": "asr", "step": "step"},
            parameter_columns={"study.cell": "cell", "defense": "defense", **{k: k.split(".", 1)[1] for k in params}},
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
