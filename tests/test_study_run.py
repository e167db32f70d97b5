"""Real studies on the real stack (Ray Tune, Optuna, MLflow on SQLite), with tiny budgets.

- a study end to end: Tune, Optuna and MLflow agree on the trials, each metric step is logged once, artifacts and
  the report are written, and a second ``abd-ray study`` on the folder refuses and points to ``resume``;
- a driver SIGKILLed in the middle of a trial, then ``abd-ray resume``: every trial finishes once, nothing is left
  RUNNING, no step is logged twice;
- a study whose warm start proposes the twin of a finished trial: answered from it (a trial in Tune, Optuna and
  MLflow, marked reused, no compute), counted once by the report; the enqueued points are the first trials;
- two Ray nodes on this machine (``ray.cluster_utils.Cluster``): trials on both, one node removed mid-trial, the
  trial restarts from its checkpoint on the other node and the study completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import yaml
from studyutil import STUDY, check_agreement, write_study
from studyutil import cli as _cli
from studyutil import trial_dirs as _trial_dirs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One teacher cache for the module: the tiny teacher is trained by the first study, reused after."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_study_end_to_end(finished_study, capsys):
    from abd_ray.cli import main

    f, uri, study_dir = finished_study["file"], finished_study["uri"], finished_study["dir"]
    a = check_agreement(study_dir, planned=3, search=2)
    assert a["steps"] and all(s == [4, 8, 12] for s in a["steps"].values())
    run = a["runs"][0]
    arts = set(a["tracker"].artifacts(run["run_id"]))
    assert {"samples.png", "trigger.png", "student.safetensors", "study.yaml"} <= arts
    params = a["tracker"].client.get_run(run["run_id"]).data.params
    assert params["synthesizer"] == "zskt" and params["study.cell"] == "badnet_grid/zskt" and "teacher_file" in params
    tags = a["tracker"].client.get_run(run["run_id"]).data.tags
    assert tags["mlflow.parentRunId"] == a["state"]["parent_run_id"]
    hist = a["tracker"].client.get_metric_history(run["run_id"], "asr")
    assert [m.step for m in hist] == [4, 8, 12]

    # The trial-to-MLflow sync is idempotent: replaying every trial's records from Tune's files changes nothing.
    from abd_ray.study.folder import StudyFolder, experiment_path
    from abd_ray.study.sync import sync_trial
    from abd_ray.study.tuner import tune_trials

    st, t = a["state"], a["tracker"]

    def runs() -> dict:
        return {r["run_id"]: (r["trial_id"], r["status"], sorted(t.artifacts(r["run_id"])))
                for r in t.child_runs(st["mlflow_experiment_id"], st["parent_run_id"])}

    before = runs()
    for tr in tune_trials(experiment_path(st)):
        assert sync_trial(t, st["mlflow_experiment_id"], st["parent_run_id"], StudyFolder(study_dir).study_file(),
                          tr) == 0
    assert runs() == before and len(before) == 3

    # The report: per-cell Pareto front, paper-style table, der, recommendation; files in the study folder.
    rep = a["report"]
    assert rep["table"][0]["defense"] == "none" and rep["table"][0]["n"] == 1
    assert len(rep["der"]) == 2 and all(0.0 <= d["der"] <= 1.0 for d in rep["der"])
    assert rep["pareto"]["badnet_grid/zskt"]
    # Both search trials are the warm start (the defaults, then coef's low end): no proposal to judge yet.
    searched = rep["search"]["badnet_grid/zskt"]
    assert sorted(r["origin"] for r in searched["trials"]) == ["defaults", "warm start"]
    assert searched["verdict"].startswith("no proposal of the sampler has finished")
    capsys.readouterr()
    assert main(["report", str(study_dir), "--json", "--max-acc-drop", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"]["badnet_grid/zskt"]["defense"] == "abd"
    for name in ("report.md", "report.json", "trials.csv", "pareto.csv", "table.csv", "der.csv",
                 "pareto_badnet_grid_zskt.png"):
        assert (study_dir / "report" / name).stat().st_size > 0, name
    assert main(["report", str(study_dir)]) == 0  # the shared study's report back at the default drop

    # The folder holds the study: a second `abd-ray study` refuses and points to resume.
    assert main(["study", str(f), "--storage", str(study_dir.parent), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "already holds study 'tiny'" in err and "abd-ray resume" in err


def test_bad_study_file_fails_before_ray(tmp_path, capsys):
    from abd_ray.cli import main

    f = write_study(tmp_path, search={**STUDY["search"], "sampler": "hyperband"})
    assert main(["study", str(f), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "search.sampler: unknown sampler 'hyperband'" in err and "allowed: tpe, nsga2, gp, random" in err
    assert not (tmp_path / "runs").exists()  # nothing was created, nothing was started


@pytest.mark.slow
def test_resume_after_sigkill_mid_trial(tmp_path, cache):
    f = write_study(tmp_path, name="killed", budget={"steps": 40, "eval_every": 4, "batch_size": 32})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "runs"
    study_dir = storage / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    # A session of its own, so that the driver and the Ray processes it started can be killed as one group.
    p = subprocess.Popen(_cli("study", str(f), "--storage", str(storage), "--tracking-uri", uri, "--cache", cache),
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    deadline = time.time() + 240
    killed = False
    try:
        while time.time() < deadline and p.poll() is None:
            # Mid-trial: some trial has a checkpoint (an evaluation is done) and none has finished.
            ckpts = [c for d in _trial_dirs(study_dir) for c in d.glob("checkpoint_*")]
            finals = [d for d in _trial_dirs(study_dir) for c in d.glob("checkpoint_*") if (c / "final.json").exists()]
            if ckpts and not finals:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log.close()
    assert killed, (tmp_path / "first.log").read_text()[-3000:]
    st = json.loads((study_dir / "study.json").read_text())
    assert st["status"] == "running"  # the driver never got to close anything

    r = subprocess.run(_cli("resume", str(study_dir)), capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = check_agreement(study_dir, planned=3, search=2, steps=40)
    assert json.loads((study_dir / "study.json").read_text())["attempts"] == 2
    for steps in a["steps"].values():
        assert steps == [4 * i for i in range(1, 11)]


@pytest.mark.slow
def test_two_nodes_one_removed_mid_trial(tmp_path, cache):
    import ray
    from ray.cluster_utils import Cluster

    from abd_ray.study.runner import launch

    f = write_study(tmp_path, name="twonodes", mode="grid", search=None, seeds=[0, 1],
                    budget={"steps": 48, "eval_every": 4, "batch_size": 32})
    assert "search" not in yaml.safe_load(f.read_text())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    removed: dict = {}
    study_dir = tmp_path / "runs" / "twonodes"

    def remove_when_busy() -> None:
        # Remove the worker node once a trial on it has reported (and checkpointed) an evaluation, mid-trial.
        deadline = time.time() + 240
        while time.time() < deadline and not removed:
            for d in _trial_dirs(study_dir):
                res = d / "result.json"
                if not res.exists():
                    continue
                lines = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
                if any(x.get("node_id") == worker.node_id and not x.get("final") for x in lines) and \
                        not any(x.get("final") for x in lines):
                    cluster.remove_node(worker, allow_graceful=False)
                    removed["trial"] = d.name
                    return
            time.sleep(0.1)

    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        th = threading.Thread(target=remove_when_busy, daemon=True)
        th.start()
        _, finished = launch(f, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                             cache_dir=cache, address=cluster.address)
        th.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "no trial ran on the worker node"
    assert finished
    a = check_agreement(study_dir, planned=2, search=0, steps=48)
    nodes_seen = set()
    restarted = None
    for d in _trial_dirs(study_dir):
        lines = [json.loads(x) for x in (d / "result.json").read_text().splitlines() if x.strip()]
        nodes_seen |= {x["node_id"] for x in lines}
        if d.name == removed["trial"]:
            restarted = lines
    assert worker.node_id in nodes_seen and len(nodes_seen) == 2, "trials ran on both nodes"
    # The trial of the removed node went on from its checkpoint on the other node, and finished there.
    assert restarted[-1]["final"] and restarted[-1]["node_id"] != worker.node_id
    assert restarted[-1]["resumed_from"] > 0
    assert a["steps"] and all(s == [4 * i for i in range(1, 13)] for s in a["steps"].values())


@pytest.mark.slow
def test_a_twin_is_answered_from_its_finished_trial_and_the_warm_start_goes_first(tmp_path, cache):
    """A fixed ABD trial at its defaults, then (one trial at a time) the search's warm start: its first point, ABD
    at its defaults, is that trial's twin and is answered from it; its second is coef's low end. The reused trial
    is a trial in Tune, Optuna and MLflow, marked as reused, and the report counts its point once."""
    import optuna

    from abd_ray.study.folder import StudyFolder
    from abd_ray.study.runner import launch

    f = write_study(tmp_path, defenses=["none", "abd"], max_concurrent=1)
    study_dir, finished = launch(f, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                 cache_dir=cache)
    assert finished
    a = check_agreement(study_dir, planned=4, search=2)
    rep = a["report"]
    (fixed,) = [r for r in rep["trials"] if r["kind"] == "grid" and r["defense"] == "abd"]
    reused = [r for r in rep["trials"] if r["reused_from"]]
    assert [r["reused_from"] for r in reused] == [f"tiny/{fixed['trial_id']}"] and rep["counts"]["reused"] == 1
    assert (reused[0]["clean_acc"], reused[0]["asr"]) == (fixed["clean_acc"], fixed["asr"])
    assert reused[0]["wall_s"] == 0.0  # nothing ran
    from abd_ray.study.report import render_markdown

    assert "1 answered from a finished twin, counted once" in render_markdown(rep)
    # Counted once: the reused trial is in no front, no der row.
    assert reused[0]["trial_id"] not in {p["trial_id"] for front in rep["pareto"].values() for p in front}
    assert reused[0]["trial_id"] not in {d["trial_id"] for d in rep["der"]} and len(rep["der"]) == 2
    run = next(r for r in a["runs"] if r["trial_id"] == reused[0]["trial_id"])
    tags = a["tracker"].client.get_run(run["run_id"]).data.tags
    assert tags["abd_ray.reused_from"] == f"tiny/{fixed['trial_id']}"
    study = optuna.load_study(study_name="tiny:badnet_grid/zskt", storage=StudyFolder(study_dir).optuna_url)
    trials = sorted(study.trials, key=lambda t: t.number)
    # The enqueued points are the first trials: the defaults, then coef's low end.
    assert [(t.params["defense.coef"], t.params["defense.hg_out_portion"]) for t in trials] == [(4.0, 0.02),
                                                                                                (0.1, 0.02)]
    assert trials[0].user_attrs["reused_from"] == f"tiny/{fixed['trial_id']}"
    assert trials[0].values == [fixed["clean_acc"], fixed["asr"]] and "reused_from" not in trials[1].user_attrs
