"""MLflow tracking: the only module of abd-ray that imports mlflow.

A study is one MLflow parent run; each trial is a child run (tag ``mlflow.parentRunId``) with the flat trial config
as params, its metric curves, and its artifacts. Only the study driver writes to MLflow (workers never do), so a
SQLite tracking database has one writer, and the driver can make a resumed trial reuse its run and log every
metric step once.

The tracking URI is, in order: ``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, MLflow's own default
``sqlite:///mlflow.db`` in the working directory (made absolute, so that ``abd-ray resume`` from another folder
writes to the same database).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow retries a failed HTTP request for about four minutes by default. A study's failed writes are recorded and
# replayed from Tune's records, so waiting that long on a server that is away would only stall the study's loop.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TRIAL_TAG = "abd_ray.trial_id"
STUDY_TAG = "abd_ray.study"
ORPHAN_TAG = "abd_ray.orphan"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch call


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    A relative SQLite path is made absolute. A ``file:`` store is refused (MLflow 3 disables it by default).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ValueError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///path/mlflow.db "
            "or http://host:5000"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            uri = "sqlite:///" + str(Path(rel).expanduser().resolve())
    return uri


_SECRET_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY|_KEY_ID)$|^AWS_|AUTH", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the values of secret-looking environment variables and URL credentials replaced by ``***``.

    Params and tags are copied into a database other people read, so a secret must never reach one, even when a
    user puts it into a config value or a tracking URI by mistake.
    """
    out = _URL_USERINFO.sub(r"\1***@", text)
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_ENV.search(name) and value in out:
            out = out.replace(value, "***")
    return out


def _param_value(v: Any) -> str:
    s = redact(str(v))
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


class Tracker:
    """A thin, stateless-on-disk wrapper over :class:`MlflowClient` for the study driver.

    Args:
        uri: a resolved tracking URI (see :func:`resolve_tracking_uri`).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if db and db != ":memory:":
            # The client opens the store, which creates and migrates a new database: two drivers doing that at
            # once (two studies sharing one database) collide.
            from filelock import FileLock

            with FileLock(db + ".lock"):
                self.client = MlflowClient(tracking_uri=uri)
        else:
            self.client = MlflowClient(tracking_uri=uri)

    # --- experiments and runs ---------------------------------------------------------------------------------------

    def experiment(self, name: str) -> str:
        """The id of the MLflow experiment ``name``, created if missing."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return self.client.create_experiment(name)

    def start_parent(self, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the study's parent run and log its params; returns the run id."""
        run = self.client.create_run(experiment_id, run_name=name,
                                     tags={k: redact(str(v)) for k, v in {STUDY_TAG: name, **tags}.items()})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_child(self, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
        """The child run of ``parent_id`` made for Tune trial ``trial_id``, if one exists (not deleted)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=5,
        )
        return runs[0].info.run_id if runs else None

    def start_child(self, experiment_id: str, parent_id: str, trial_id: str, name: str, params: dict[str, Any],
                    tags: dict[str, str]) -> str:
        """Create a trial's child run (tagged with its parent and its Tune trial id) and log its params."""
        run = self.client.create_run(
            experiment_id, run_name=name,
            tags={k: redact(str(v)) for k, v in {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **tags}.items()},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def child_runs(self, experiment_id: str, parent_id: str) -> list[dict[str, Any]]:
        """Every (not deleted) child run of ``parent_id``: run id, trial id, status, metrics."""
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token,
            )
            for r in page:
                out.append({"run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_TAG),
                            "status": r.info.status, "metrics": dict(r.data.metrics), "name": r.info.run_name})
            token = page.token
            if not token:
                return out

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status (RUNNING, FINISHED, FAILED, KILLED); a terminal status also sets its end time."""
        RunStatus.from_string(status)  # raises for a status MLflow does not know
        if status in ("RUNNING", "SCHEDULED"):
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))

    def delete(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    # --- data -------------------------------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (values as strings, cut at MLflow's length limit); keys already logged are skipped."""
        have = self.client.get_run(run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in have]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Log finite numbers and NaN at ``step`` in one batch (callers make sure a step is logged once)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isinf(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def logged_steps(self, run_id: str, key: str) -> list[int]:
        """The steps at which ``key`` was logged in a run (empty if never)."""
        return [m.step for m in self.client.get_metric_history(run_id, key)]

    def metric_keys(self, run_id: str) -> set[str]:
        return set(self.client.get_run(run_id).data.metrics)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Paths of the artifacts of a run (recursively)."""
        out: list[str] = []
        for f in self.client.list_artifacts(run_id, path):
            if f.is_dir:
                out.extend(self.artifacts(run_id, f.path))
            else:
                out.append(f.path)
        return out


def ui_links(uri: str, experiment_id: str | None, run_id: str | None = None, port: int = 5000) -> dict[str, Any]:
    """How to open a study in the MLflow UI: the command that serves it (None where the tracking URI is already a
    server), and the URLs of its experiment's runs view, of its trials (the parent run's children, flat and sorted
    by name) and of its parent run.

    Runs views, not the experiment's page: MLflow 3 opens an experiment on its GenAI overview (traces), which is
    empty for a study. The runs view nests the trials, collapsed, under the parent run; sorting by anything but
    the date lists them flat, which is what the trials URL does.
    """
    none = {"command": None, "experiment_url": None, "trials_url": None, "run_url": None}
    if uri.startswith(("http://", "https://")):
        base, command = redact(uri.rstrip("/")), None
    elif uri.startswith("databricks") or not experiment_id:
        return none
    else:
        base = f"http://127.0.0.1:{port}"
        command = f"mlflow ui --backend-store-uri {redact(uri)} --port {port}"
    exp = f"{base}/#/experiments/{experiment_id}/runs"
    out = {**none, "command": command, "experiment_url": exp}
    if run_id:
        flt = quote(f"tags.`{PARENT_TAG}` = '{run_id}'", safe="")
        by_name = quote("tags.`mlflow.runName`", safe="")  # the UI's own key of its "Run Name" sort
        out.update(trials_url=f"{exp}?searchFilter={flt}&orderByKey={by_name}&orderByAsc=true",
                   run_url=f"{exp}/{run_id}")
    return out
