"""What a researcher sees of a study: trial names and folders, the console table, ``abd-ray status``, the MLflow
links and the parent run's report, optuna-dashboard, and (where Chromium is installed) the MLflow runs view and the
dashboard rendered in a real browser.

One tiny study runs once for the session (tests/conftest.py), through the ``abd-ray`` command as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from studyutil import cli, trial_dirs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import screenshots as shots  # noqa: E402 - the project's own server and browser helpers

pytestmark = pytest.mark.slow

LABEL = re.compile(r"^badnet_grid/zskt/(none|abd)/s0/[0-9a-f]{8}(_\d+)?$")


@pytest.fixture(scope="module")
def study(finished_study) -> dict:
    """The session's finished tiny study (tests/conftest.py)."""
    return finished_study


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("status", *args), capture_output=True, text=True, timeout=120)


def test_trials_are_named_by_what_they_are(study):
    from abd_ray.tracking import Tracker

    st = json.loads((study["dir"] / "study.json").read_text())
    runs = Tracker(study["uri"]).child_runs(st["mlflow_experiment_id"], st["parent_run_id"])
    names = {r["trial_id"]: r["name"] for r in runs}
    assert len(names) == 3 and all(LABEL.match(n) and n.endswith(tid) for tid, n in names.items()), names
    assert sorted(n.split("/")[2] for n in names.values()) == ["abd", "abd", "none"]
    # The folders spell the same label with '-' (a folder name cannot hold '/').
    assert sorted(d.name for d in trial_dirs(study["dir"])) == sorted(n.replace("/", "-") for n in names.values())
    # Tune's table: the names, the cell, defense, searched hyperparameters, clean_acc, asr and step.
    header = [x for x in study["log"].splitlines() if x.startswith("| Trial name")][-1]  # the last, with results
    assert [c.strip() for c in header.strip("|").split("|")][3:] == [
        "cell", "defense", "coef", "hg_out_portion", "clean_acc", "asr", "step"]
    assert all(n in study["log"] for n in names.values())
    # Ray's per-checkpoint lines and its TensorBoard hint stay out of the console by default.
    assert "Checkpoint successfully created" not in study["log"] and "TensorBoard" not in study["log"]


def test_verbose_brings_rays_output_back(monkeypatch):
    import logging

    from abd_ray.cli.studies import set_verbosity
    from abd_ray.study.trainable import VERBOSE_ENV, quiet_ray_logs

    monkeypatch.setenv(VERBOSE_ENV, "0")
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    logger = logging.getLogger("ray.train")
    monkeypatch.setattr(logger, "level", logging.INFO)
    set_verbosity(True)
    quiet_ray_logs()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and logger.level == logging.INFO
    set_verbosity(False)
    quiet_ray_logs()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" and logger.level == logging.WARNING


def test_the_end_of_a_study_says_how_to_open_mlflow(study):
    from abd_ray.tracking import Tracker

    st = json.loads((study["dir"] / "study.json").read_text())
    exp, parent = st["mlflow_experiment_id"], st["parent_run_id"]
    runs_url = f"http://127.0.0.1:5000/#/experiments/{exp}/runs"
    for text in (study["log"].split("report: ")[-1], (study["dir"] / "report" / "report.md").read_text()):
        assert f"mlflow ui --backend-store-uri {study['uri']} --port 5000" in text
        assert f"runs view:    {runs_url}\n" in text and f"parent run:   {runs_url}/{parent}" in text
        assert f"its trials:   {runs_url}?searchFilter=tags.%60mlflow.parentRunId%60%20%3D%20%27{parent}%27" in text
    # The parent run carries the report and its summary metrics.
    t = Tracker(study["uri"])
    arts = set(t.artifacts(parent))
    assert {"report/report.md", "report/report.json", "report/pareto_badnet_grid_zskt.png"} <= arts, arts
    metrics = t.client.get_run(parent).data.metrics
    rep = json.loads((study["dir"] / "report" / "report.json").read_text())
    rec = rep["recommended"]["badnet_grid/zskt"]
    assert metrics["badnet_grid/zskt/recommended_clean_acc"] == pytest.approx(rec["clean_acc"])
    assert metrics["badnet_grid/zskt/recommended_asr"] == pytest.approx(rec["asr"])
    assert metrics["badnet_grid/zskt/hypervolume"] == pytest.approx(rep["hypervolume"]["badnet_grid/zskt"])
    assert 0 < metrics["badnet_grid/zskt/hypervolume"] <= 10_000


def test_status_of_a_finished_study(study):
    p = _status(str(study["dir"]), "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["counts"] == {"planned": 3, "finished": 3, "failed": 0, "running": 0, "interrupted": 0, "pending": 0}
    assert st["driver_pid"] is None and st["resume"] is None and st["status"] == "finished"
    rep = json.loads((study["dir"] / "report" / "report.json").read_text())
    best = st["best"]["badnet_grid/zskt"]
    assert best["recommended"]["trial_id"] == rep["recommended"]["badnet_grid/zskt"]["trial_id"]
    assert best["hypervolume"] == pytest.approx(rep["hypervolume"]["badnet_grid/zskt"])
    assert st["mlflow"]["children"] == {"FINISHED": 3}
    assert all(LABEL.match(t["name"]) for t in st["trials"])
    text = _status(str(study["dir"])).stdout
    assert "trials: planned 3, finished 3, failed 0, running 0, pending 0" in text
    assert "no driver is running it" in text and "best so far in badnet_grid/zskt: abd" in text


def test_status_while_a_driver_holds_the_lock(study, tmp_path):
    from filelock import FileLock, Timeout

    from abd_ray.study.folder import StudyFolder

    # A copy of the folder, so that the module's study stays finished for the other tests.
    d = tmp_path / "tiny"
    shutil.copytree(study["dir"], d, ignore=shutil.ignore_patterns(".lock*"))
    state = json.loads((d / "study.json").read_text())
    (d / "study.json").write_text(json.dumps({**state, "status": "running"}))
    # One trial still running as Tune last saw it, and not ended in Optuna (its record there removed).
    snap = sorted((d / "tune").glob("experiment_state-*.json"))[-1]
    exp = json.loads(snap.read_text())
    trial = json.loads(exp["trial_data"][0][0])
    exp["trial_data"][0][0] = json.dumps({**trial, "status": "RUNNING"})
    snap.write_text(json.dumps(exp))
    db = sqlite3.connect(d / "optuna.db")
    with db:
        db.execute("DELETE FROM trials WHERE trial_id IN (SELECT trial_id FROM trial_user_attributes "
                   "WHERE key = 'tune_trial_id' AND value_json = ?)", (json.dumps(trial["trial_id"]),))
    db.close()
    lk = StudyFolder(d).lock()
    try:
        p = _status(str(d), "--json", "--no-mlflow")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["driver_pid"] == os.getpid() and st["resume"] is None and "mlflow" not in st
        assert st["counts"] == {"planned": 3, "finished": 2, "failed": 0, "running": 1, "interrupted": 0,
                                "pending": 0}
        running = [t for t in st["trials"] if t["status"] == "RUNNING"]
        assert [t["trial_id"] for t in running] == [trial["trial_id"]] and running[0]["step"] == 12
        # status only looked: the driver still holds its lock.
        with pytest.raises(Timeout):
            FileLock(str(d / ".lock")).acquire(timeout=0)
    finally:
        lk.release()
    st = json.loads(_status(str(d), "--json", "--no-mlflow").stdout)
    assert st["driver_pid"] is None and st["resume"] == f"abd-ray resume {d}"
    assert st["counts"]["running"] == 0 and st["counts"]["interrupted"] == 1  # its driver is gone


def test_status_refuses_a_folder_without_a_study(tmp_path):
    p = _status(str(tmp_path))
    assert p.returncode == 2 and "holds no abd-ray study" in p.stderr and "Traceback" not in p.stderr


# --- servers and a browser ------------------------------------------------------------------------------------------


def chromium_dom(url: str, profile: Path, budget_ms: int = 30000) -> str:
    """The DOM of ``url`` once headless Chromium has run its scripts for ``budget_ms`` of virtual time."""
    return shots.chromium(url, profile, "--dump-dom", budget_ms=budget_ms)


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)")


def _mlflow_links(study_dir: Path, port: int) -> dict:
    from abd_ray.tracking import ui_links

    st = json.loads((study_dir / "study.json").read_text())
    return ui_links(st["tracking_uri"], st["mlflow_experiment_id"], st["parent_run_id"], port=port)


@pytest.mark.browser
@needs_chromium
def test_mlflow_runs_view_in_a_browser(study, tmp_path):
    from abd_ray.tracking import Tracker

    port = shots.free_port()
    links = _mlflow_links(study["dir"], port)
    assert links["command"] == f"mlflow ui --backend-store-uri {study['uri']} --port {port}"
    srv = shots.mlflow_server(study["uri"], port, tmp_path / "mlflow.log", tmp_path)
    try:
        runs_view = chromium_dom(links["experiment_url"], tmp_path / "profile")
        trials = chromium_dom(links["trials_url"], tmp_path / "profile")
    finally:
        shots.stop(srv)
    st = json.loads((study["dir"] / "study.json").read_text())
    # The runs view lists the study's parent run (its trials nested under it, collapsed) ...
    parent_link = f'href="#/experiments/{st["mlflow_experiment_id"]}/runs/{st["parent_run_id"]}"'
    assert parent_link in runs_view, runs_view[-2000:]
    # ... and the trials view every child run, by name.
    names = [r["name"] for r in Tracker(study["uri"]).child_runs(st["mlflow_experiment_id"], st["parent_run_id"])]
    missing = [n for n in names if n not in trials]
    assert len(names) == 3 and not missing, f"child runs not in the rendered trials view: {missing}\n{trials[-2000:]}"


def _dashboard(study_dir: Path, port: int, tmp: Path) -> subprocess.Popen:
    url = f"http://127.0.0.1:{port}/api/studies"
    return shots.serve(cli("dashboard", str(study_dir), "--port", str(port)), url, tmp / "dashboard.log", tmp)


needs_dashboard = pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None,
                                     reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")


@needs_dashboard
def test_dashboard_serves_the_studys_optuna_db(study, tmp_path):
    port = shots.free_port()
    srv = _dashboard(study["dir"], port, tmp_path)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
            studies = json.loads(r.read())["study_summaries"]
    finally:
        shots.stop(srv)
    assert {s["study_name"] for s in studies} == {"tiny:badnet_grid/zskt", "tiny:badnet_grid/zskt:grid"}
    assert (tmp_path / "dashboard.log").read_text().startswith(f"optuna-dashboard for tiny on http://127.0.0.1:{port}/")


@pytest.mark.browser
@needs_chromium
@needs_dashboard
def test_dashboard_in_a_browser(study, tmp_path):
    port = shots.free_port()
    srv = _dashboard(study["dir"], port, tmp_path)
    try:
        dom = chromium_dom(f"http://127.0.0.1:{port}/dashboard/", tmp_path / "profile", 20000)
    finally:
        shots.stop(srv)
    assert "tiny:badnet_grid/zskt" in dom and "tiny:badnet_grid/zskt:grid" in dom, dom[-2000:]


def test_dashboard_without_the_extra_says_how_to_install_it(study, tmp_path):
    # A Python that cannot import optuna_dashboard: a shadowing module that raises ImportError.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "optuna_dashboard.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cli("dashboard", str(study["dir"])), capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "pip install -e '.[dashboard]'" in p.stderr and len(p.stderr.splitlines()) == 1
