"""Fault injection against the real stack (Ray Tune, Optuna, MLflow on SQLite), with tiny budgets.

Two studies carry most checks, so the suite stays within a few minutes on two cores:

- ``killed``: the driver SIGKILLed in the teacher stage, then mid-trial; the cached teacher and the running trial's
  checkpoints truncated; a resume (the teacher is retrained, the trial starts over, both with a warning) stopped
  with SIGINT; the study file edited and a resume SIGKILLed between two trials, another mid-trial (the kills of the
  teacher stage, between and mid-trial at seeded moments); the folder's copy edited and refused; a last resume
  that completes. At the end Tune's trials = Optuna's COMPLETE trials = MLflow's FINISHED child runs = the planned
  count, and no step is logged twice.
- ``faulty``: one trial raising (``fault.raise_at_step``) and one whose losses go NaN (``fault.nan_at_step``),
  each retried once and then FAILED with its reason in Tune, Optuna and MLflow; the MLflow database locked for a
  while (the writes that fail are replayed at the end); a second driver on the folder refused by the lock; no
  secret of the environment in any MLflow param or log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from studyutil import (
    check_agreement,
    cli,
    driver_tracebacks,
    kill_when,
    results,
    start_driver,
    trial_dirs,
    wait,
    write_study,
)

pytestmark = pytest.mark.faults

TINY = {"synth": {"zskt": {"n_s": 1}}, "defenses": ["none"], "teacher": {"epochs": 3, "seed": 7},
        "resources": {"cpu": 1}, "search": None, "mode": "grid"}
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-9f2c1e77aa", "AWS_SECRET_ACCESS_KEY": "aws-5be04c3d19",
           "AWS_ACCESS_KEY_ID": "AKIAFAKE0451"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-cache")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _teacher_dirs(cache: Path) -> list[Path]:
    return [d for d in (cache / "teachers").glob("*") if d.is_dir() and (d / "teacher.json").exists()] \
        if (cache / "teachers").exists() else []


@pytest.mark.slow
def test_kills_sigint_damaged_files_and_edited_study_files_then_resume(tmp_path, cache):
    """Four trials, one at a time, through six drivers: SIGKILL in the teacher stage (a seeded moment); SIGKILL
    mid-trial; the cached teacher and the running trial's checkpoints damaged, then Ctrl-C; the study file edited
    (the copy taken at launch runs) and SIGKILL between trials (a seeded moment); SIGKILL mid-trial again (a seeded
    moment); the folder's copy edited (refused); a last resume that completes. At the end Tune's trials = Optuna's
    COMPLETE trials = MLflow's FINISHED child runs = the planned count, and no step is logged twice."""
    rng = random.Random(18)
    shutil.rmtree(cache / "teachers", ignore_errors=True)  # the teacher stage must really train
    n = 4
    # One trial at a time: however many a slow Ctrl-C lets finish in step 3, gaps between trials remain for 4 and 5.
    f = write_study(tmp_path, name="killed", seeds=list(range(n)), max_concurrent=1, max_failures=2,
                    budget={"steps": 40, "eval_every": 4, "batch_size": 32}, **TINY)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study_dir = tmp_path / "runs" / "killed"
    logs = [tmp_path / f"driver{i}.log" for i in range(6)]

    def finished() -> int:
        return sum(any(x.get("final") for x in results(d)) for d in trial_dirs(study_dir))

    # 1. SIGKILL in the teacher stage, a seeded fraction of a second after it began: before any teacher is written.
    delay, seen = rng.uniform(0.0, 0.5), []

    def in_teacher_stage() -> bool:
        if not seen and "teacher stage" in logs[0].read_text():
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] >= delay

    p = start_driver(["study", str(f), "--storage", str(tmp_path / "runs"), "--tracking-uri", uri, "--cache",
                      str(cache)], logs[0], tmp_path)
    kill_when(p, in_teacher_stage, logs[0])
    wait(p)
    assert not _teacher_dirs(cache) and not trial_dirs(study_dir), "killed in the teacher stage"

    # 2. resume, SIGKILL mid-trial: a trial has checkpointed three evaluations (so Tune's saved state holds one)
    # and none has finished.
    def first_mid_trial() -> bool:
        rs = [results(d) for d in trial_dirs(study_dir)]
        return any(len(r) >= 3 for r in rs) and not any(x.get("final") for r in rs for x in r)

    p = start_driver(["resume", str(study_dir)], logs[1], tmp_path)
    kill_when(p, first_mid_trial, logs[1])
    wait(p)
    (teacher,) = _teacher_dirs(cache)
    running = [d for d in trial_dirs(study_dir) if results(d) and not any(x.get("final") for x in results(d))]
    assert len(running) == 1

    # 3. damage: the cached teacher's weights and every checkpoint of the running trial, cut short.
    w = teacher / "teacher.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    states = list(running[0].glob("checkpoint_*/state.pt"))
    assert states
    for s in states:
        s.write_bytes(s.read_bytes()[:100])
    before = len(results(running[0]))

    # ... resume: the teacher is retrained, the trial starts over (warnings say so); Ctrl-C once it has moved on.
    p = start_driver(["resume", str(study_dir)], logs[2], tmp_path)
    kill_when(p, lambda: len(results(running[0])) >= before + 2, logs[2], sig=signal.SIGINT, group=False)
    rc = wait(p, 180)
    out = logs[2].read_text()
    assert rc == 1, out[-3000:]
    assert "cached teacher is damaged, retraining it" in out and "do not match their recorded SHA-256" in out
    assert "is unreadable" in out and "starting the run over" in out
    assert f"continue it with: abd-ray resume {study_dir}" in out
    assert not driver_tracebacks(out.split("interrupted")[-1])
    assert json.loads((study_dir / "study.json").read_text())["status"] == "interrupted"
    meta = json.loads((teacher / "teacher.json").read_text())
    import hashlib

    assert hashlib.sha256((teacher / "teacher.safetensors").read_bytes()).hexdigest() == meta["weights_sha256"]
    restarted = results(running[0])[before:]
    assert restarted and restarted[0]["resumed_from"] == 0 and restarted[0]["step"] == 4

    # 4. The study file edited by hand: the resume says so and runs the copy taken at launch (40 steps, not 48);
    # SIGKILL between trials, the moment a seeded number of trials have finished.
    finals0 = finished()
    assert finals0 <= 2, "step 3's Ctrl-C let the study run to its last trial"
    original = f.read_text()
    f.write_text(original.replace("steps: 40", "steps: 48"))
    target = rng.randint(finals0 + 1, n - 1)
    p = start_driver(["resume", str(study_dir)], logs[3], tmp_path)
    kill_when(p, lambda: finished() >= target, logs[3])
    wait(p)
    assert "changed since the study began (budget.steps: 40 -> 48)" in logs[3].read_text()
    assert "resuming with the copy taken at launch" in logs[3].read_text()
    at_kill = finished()
    assert at_kill < n

    # 5. Mid-trial again: once a seeded number of trials have finished and the running one has reported a seeded
    # number of evaluations in this attempt (the trial that step 4 cut short has some from before).
    done, evals = rng.randint(at_kill, n - 1), rng.randint(1, 2)
    start = {d: len(results(d)) for d in trial_dirs(study_dir)}

    def mid_trial() -> bool:
        return finished() >= done and any(rs and not rs[-1].get("final") and len(rs) - start.get(d, 0) >= evals
                                          for d, rs in ((d, results(d)) for d in trial_dirs(study_dir)))

    p = start_driver(["resume", str(study_dir)], logs[4], tmp_path)
    kill_when(p, mid_trial, logs[4])
    wait(p)
    assert finished() < n

    # 6. The folder's own copy edited: refused (exit 2, one line), nothing started; restored, the study goes on.
    copy = study_dir / "study.yaml"
    launched = copy.read_text()
    copy.write_text(launched.replace("max_failures: 2", "max_failures: 5"))
    r = subprocess.run(cli("resume", str(study_dir)), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "was edited since the study began (max_failures: 2 -> 5)" in r.stderr, r.stderr
    copy.write_text(launched)

    # 7. the last resume completes.
    p = start_driver(["resume", str(study_dir)], logs[5], tmp_path)
    rc = wait(p, 420)
    assert rc == 0, logs[5].read_text()[-3000:]
    a = check_agreement(study_dir, planned=n, steps=40)
    assert all(s == [4 * i for i in range(1, 11)] for s in a["steps"].values()), a["steps"]
    st = json.loads((study_dir / "study.json").read_text())
    assert st["attempts"] == 6 and st["status"] == "finished"
    assert len(_teacher_dirs(cache)) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(db: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1 (SQLite store, a local artifact root it serves), answering /health."""
    import urllib.request

    mlflow = str(Path(os.sys.executable).with_name("mlflow"))
    p = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)],
                         stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start:\n" + log.read_text()[-3000:])


@pytest.mark.slow
def test_tracking_server_killed_mid_study_and_restarted_60_s_later(tmp_path):
    """A study tracked by a real ``mlflow server``: the server is SIGKILLed once the trials report, and started
    again 60 s later. The trials run on through the outage; when the study ends each trial's run is FINISHED once,
    with each step once and its artifacts, and Tune, Optuna and MLflow agree."""
    port = _free_port()
    db, artifacts, server_log = tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log"
    # Two trials side by side, each 90 s or more (two evaluations, each followed by 45 s of sleep): the outage, 60 s
    # from their first evaluation, ends well before they do, and their second evaluation falls inside it.
    f = write_study(tmp_path, name="outage", seeds=[0, 1], max_concurrent=2,
                    budget={"steps": 8, "eval_every": 4, "batch_size": 32}, faults=[{"pause_per_eval_s": 45}], **TINY)
    study_dir, log = tmp_path / "runs" / "outage", tmp_path / "driver.log"
    server = _start_mlflow_server(db, artifacts, port, server_log)
    p = None
    try:
        p = start_driver(["study", str(f), "--storage", str(tmp_path / "runs"), "--tracking-uri",
                          f"http://127.0.0.1:{port}", "--cache", str(tmp_path / "cache")], log, tmp_path)

        def evaluations() -> int:
            return sum(len(results(d)) for d in trial_dirs(study_dir))

        kill_when(server, lambda: evaluations() >= 1, server_log, timeout=300)
        server.wait()
        down_at, during = time.time(), evaluations()
        time.sleep(60)
        assert p.poll() is None, "the study ended during the outage:\n" + log.read_text()[-3000:]
        assert evaluations() > during, "the trials kept running while the tracking server was away"
        server = _start_mlflow_server(db, artifacts, port, server_log)
        assert time.time() - down_at >= 60
        assert wait(p, 420) == 0, log.read_text()[-3000:]
        assert not (study_dir / "tracking_errors.jsonl").exists(), "every write of the outage was replayed"
        assert (study_dir / "tracking_errors.replayed.jsonl").exists(), "the outage was met"
        a = check_agreement(study_dir, planned=2, steps=8)
        assert all(s == [4, 8] for s in a["steps"].values()), a["steps"]
        for run in a["runs"]:
            arts = set(a["tracker"].artifacts(run["run_id"]))
            assert {"samples.png", "trigger.png", "student.safetensors", "final.json"} <= arts, arts
    finally:
        for proc in (p, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_a_full_disk_stops_the_study_and_resume_finishes_it(tmp_path):
    """The study folder on a 48 MiB tmpfs, filled to the last byte once a trial has finished: the driver stops with
    one line, the finished trials, optuna.db and study.json stay whole, and after the space is freed a resume
    finishes the study."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {made.stderr.strip()}")
    env = {"ABD_RAY_MIN_FREE_MB": "16"}
    study_dir, logs = mnt / "full", [tmp_path / "driver0.log", tmp_path / "driver1.log"]
    f = write_study(tmp_path, name="full", seeds=[0, 1, 2, 3], max_concurrent=2, max_failures=3,
                    budget={"steps": 24, "eval_every": 4, "batch_size": 32}, **TINY)
    try:
        p = start_driver(["study", str(f), "--storage", str(mnt), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                          "--cache", str(tmp_path / "cache")], logs[0], tmp_path, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and \
                not any(rs and rs[-1].get("final") for rs in map(results, trial_dirs(study_dir))):
            time.sleep(0.1)
        filler = mnt / "filler"
        with open(filler, "wb") as out:
            try:
                while True:
                    out.write(b"\0" * 2**20)
                    out.flush()
            except OSError:
                pass  # the file system is full
        assert shutil.disk_usage(mnt).free < 2**20
        assert wait(p, 300) == 1, logs[0].read_text()[-3000:]
        last = logs[0].read_text().strip().splitlines()[-1]
        assert last.startswith("abd-ray study: stopped: the file system of ") and "MiB free" in last, last
        assert f"abd-ray resume {study_dir}" in last

        # Nothing already finished is damaged: its records parse whole, its final checkpoint is there.
        done = [d for d in trial_dirs(study_dir) if (rs := results(d)) and rs[-1].get("final")]
        assert done
        for d in done:
            [json.loads(x) for x in (d / "result.json").read_text().splitlines()]
            assert list(d.glob("checkpoint_*/final.json"))
        with sqlite3.connect(study_dir / "optuna.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # Written atomically: whole, and as the full disk allowed (the last status it could record).
        assert json.loads((study_dir / "study.json").read_text())["status"] in ("running", "interrupted")

        filler.unlink()
        p = start_driver(["resume", str(study_dir)], logs[1], tmp_path, env=env)
        assert wait(p, 420) == 0, logs[1].read_text()[-3000:]
        a = check_agreement(study_dir, planned=4, steps=24)
        assert all(s == [4 * i for i in range(1, 7)] for s in a["steps"].values()), a["steps"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_two_studies_at_once_share_the_teacher_cache_and_the_tracking_database(tmp_path):
    """Two drivers started together on one machine, one teacher cache, one MLflow database: the teacher both need
    is trained once, both studies finish, and each one's Tune, Optuna and MLflow agree."""
    cache, uri = tmp_path / "cache", f"sqlite:///{tmp_path}/mlflow.db"
    budget = {"steps": 12, "eval_every": 4, "batch_size": 32}
    first = write_study(tmp_path, name="first", attacks=["badnet_grid", "blend"], seeds=[0], budget=budget, **TINY)
    second = write_study(tmp_path, name="second", attacks=["badnet_grid"], seeds=[0, 1], budget=budget, **TINY)
    logs = {f.stem: tmp_path / f"{f.stem}.log" for f in (first, second)}
    drivers = {f.stem: start_driver(["study", str(f), "--storage", str(tmp_path / "runs"), "--tracking-uri", uri,
                                     "--cache", str(cache)], logs[f.stem], tmp_path) for f in (first, second)}
    for name, p in drivers.items():
        assert wait(p, 480) == 0, logs[name].read_text()[-3000:]
    text = "".join(log.read_text() for log in logs.values())
    for attack in ("badnet_grid", "blend"):
        lines = [x.split() for x in text.splitlines() if x.strip().startswith(attack + " ") and "clean_acc" in x]
        assert [x[5] for x in lines].count("trained") == 1, lines  # trained by one driver, the other waited for it
    assert len(_teacher_dirs(cache)) == 2
    assert not driver_tracebacks(text) and "database is locked" not in text.lower()
    check_agreement(tmp_path / "runs" / "first", planned=2, steps=12)
    check_agreement(tmp_path / "runs" / "second", planned=2, steps=12)


@pytest.mark.slow
def test_failing_trials_locked_mlflow_second_driver_and_secrets(tmp_path, cache):
    f = write_study(tmp_path, name="faulty", seeds=[0, 1, 2], max_concurrent=2, max_failures=1,
                    budget={"steps": 24, "eval_every": 4, "batch_size": 32},
                    faults=[{"seed": 1, "raise_at_step": 12}, {"seed": 2, "nan_at_step": 8}], **TINY)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    study_dir = tmp_path / "runs" / "faulty"
    log = tmp_path / "driver.log"
    p = start_driver(["study", str(f), "--storage", str(tmp_path / "runs"), "--tracking-uri", uri, "--cache",
                      str(cache)], log, tmp_path, env=SECRETS)
    import subprocess

    try:
        # A second driver on the same folder, while the first runs: refused by the lock, nothing of the first touched.
        deadline = time.time() + 120
        while not (study_dir / "study.json").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        spec_copy = (study_dir / "study.yaml").read_bytes()
        first = json.loads((study_dir / "study.json").read_text())
        for argv in (["study", str(f), "--storage", str(tmp_path / "runs"), "--tracking-uri", uri],
                     ["resume", str(study_dir)]):
            r = subprocess.run(cli(*argv), capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert r.returncode == 2, r.stderr
            assert "is in use by another abd-ray process" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert (study_dir / "study.yaml").read_bytes() == spec_copy
        assert json.loads((study_dir / "study.json").read_text())["created"] == first["created"]

        # The tracking database locked (as by another writer) once the trials report: MLflow writes fail.
        deadline = time.time() + 180
        while not any(results(d) for d in trial_dirs(study_dir)) and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        con = sqlite3.connect(db, timeout=60, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(24)  # longer than MLflow's 20 s wait for a locked SQLite database
        con.execute("ROLLBACK")
        con.close()
        rc = wait(p, 300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 0, out[-4000:]

    # The failures were recorded, then replayed from Tune's records once the database answered.
    assert "failed tracking write(s) replayed" in out, out[-3000:]
    assert not (study_dir / "tracking_errors.jsonl").exists()
    assert (study_dir / "tracking_errors.replayed.jsonl").read_text().strip()

    a = check_agreement(study_dir, planned=3, steps=24, failed=2)
    rows = {r["seed"]: r for r in a["report"]["trials"]}
    assert rows[0]["status"] == "TERMINATED" and a["steps"][rows[0]["trial_id"]] == [4, 8, 12, 16, 20, 24]
    assert "fault.raise_at_step=12" in rows[1]["error"], rows[1]
    assert "non-finite loss" in rows[2]["error"], rows[2]
    # Retried as configured (max_failures 1): each failing trial ran twice.
    from abd_ray.study.tuner import tune_trials

    nfail = {tr["trial_id"]: tr["num_failures"] for tr in tune_trials(str(study_dir / "tune"))}
    assert nfail[rows[1]["trial_id"]] == 2 and nfail[rows[2]["trial_id"]] == 2 and nfail[rows[0]["trial_id"]] == 0
    # The reason in Optuna (on the cell's study, keyed by the Tune trial id) and in MLflow (a tag of the run).
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir}/optuna.db")
    attrs = {}
    for s in optuna.get_all_study_summaries(storage):
        attrs.update(optuna.load_study(study_name=s.study_name, storage=storage).user_attrs)
    assert "fault.raise_at_step=12" in attrs[f"error.{rows[1]['trial_id']}"]
    assert "non-finite loss" in attrs[f"error.{rows[2]['trial_id']}"]
    t = a["tracker"]
    for seed, needle in ((1, "fault.raise_at_step"), (2, "non-finite loss")):
        run = next(r for r in a["runs"] if r["trial_id"] == rows[seed]["trial_id"])
        assert needle in t.client.get_run(run["run_id"]).data.tags["abd_ray.error"]
    # The report lists the failures.
    md = (study_dir / "report" / "report.md").read_text()
    assert "Trials that did not finish" in md and rows[1]["trial_id"] in md and rows[2]["trial_id"] in md

    # No secret of the environment in any param or tag, the driver's output or the study folder's record.
    texts = [out, (study_dir / "study.json").read_text()]
    for run in a["runs"] + [{"run_id": a["state"]["parent_run_id"]}]:
        data = t.client.get_run(run["run_id"]).data
        texts += [json.dumps(data.params), json.dumps(data.tags)]
    for secret in SECRETS.values():
        assert not any(secret in x for x in texts), secret


def test_replay_keeps_records_while_mlflow_is_unreachable(tmp_path):
    from abd_ray.study.folder import TRACKING_ERRORS
    from abd_ray.study.sync import replay_tracking_errors

    (tmp_path / "study.json").write_text(json.dumps({
        "tracking_uri": f"sqlite:///{tmp_path}/no/such/dir/mlflow.db", "mlflow_experiment_id": "1",
        "parent_run_id": "x"}))
    rec = {"time": 0, "hook": "on_trial_result", "trial_id": "t1", "error": "OperationalError: locked", "step": 4}
    (tmp_path / TRACKING_ERRORS).write_text(json.dumps(rec) + "\n")
    res = replay_tracking_errors(tmp_path, [{"trial_id": "t1", "status": "TERMINATED", "config": {},
                                             "path": str(tmp_path), "error": None}])
    assert res["pending"] == 1 and res["replayed"] == 0
    assert json.loads((tmp_path / TRACKING_ERRORS).read_text()) == rec  # kept for the next attempt


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from ray import tune

    from abd_ray.engine.distill import STATE_FORMAT, save_state
    from abd_ray.study.trainable import STATE_FILE, _read_checkpoint

    for i, step in ((0, 4), (1, 8)):
        save_state({"format": STATE_FORMAT, "step": step, "w": torch.ones(3) * step},
                   tmp_path / f"checkpoint_00000{i}" / STATE_FILE)
    newest = tmp_path / "checkpoint_000001" / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:50])
    with pytest.warns(UserWarning, match="falling back to the older checkpoint .*checkpoint_000000 \\(step 4\\)"):
        state, final, _ = _read_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "checkpoint_000001")))
    assert final is None and state["step"] == 4 and torch.equal(state["w"], torch.ones(3) * 4)
    # Nothing older reads either: start over, with a warning.
    old = tmp_path / "checkpoint_000000" / STATE_FILE
    old.write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="starting the run over"):
        state, final, _ = _read_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "checkpoint_000001")))
    assert state is None and final is None
    warnings.simplefilter("default")


def test_driver_tracebacks_skip_only_a_ray_worker_shut_down_by_sigterm():
    esc = "\x1b[36m(train_trial pid=3235)\x1b[0m "
    shutdown = [esc + "Traceback (most recent call last):",
                esc + '  File "/x/ray/_private/worker.py", line 1063, in sigterm_handler',
                esc + "SystemExit: 1"]
    failure = ["(train_trial pid=7) Traceback (most recent call last):",
               '(train_trial pid=7)   File "/x/abd_ray/engine/distill.py", line 3, in run',
               "(train_trial pid=7) KeyError: 1"]
    driver = ["Traceback (most recent call last):", '  File "/x/abd_ray/cli/studies.py", line 9', "ValueError: x"]
    assert driver_tracebacks("\n".join(["ok", *shutdown, "done"])) == []
    found = driver_tracebacks("\n".join([*shutdown, *failure, "status line", *driver]))
    assert len(found) == 2 and "KeyError" in found[0] and "ValueError" in found[1]


def test_non_finite_losses_are_caught():
    from abd_ray.study.trainable import check_finite

    check_finite({"clean_acc": 10.0, "loss_kd": 1.5, "asr": float("nan")}, 4)  # a NaN asr is no loss
    with pytest.raises(FloatingPointError, match="non-finite loss loss_kd=nan at step 8"):
        check_finite({"loss_kd": float("nan")}, 8)
    with pytest.raises(FloatingPointError, match="loss_gen=inf"):
        check_finite({"loss_gen": float("inf")}, 8)


def test_a_full_disk_is_recognised_through_wrapped_errors():
    from abd_ray.study.diskspace import StorageFull, check_free_space, is_disk_full

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("trial failed") from inner
    except RuntimeError as e:
        assert is_disk_full(e)
    assert is_disk_full(RuntimeError("(sqlite3.OperationalError) database or disk is full"))
    assert not is_disk_full(RuntimeError("database is locked"))
    with pytest.raises(StorageFull, match=r"has [0-9.]+ MiB free, under the 1e\+12 MiB .*; run it again"):
        check_free_space([os.getcwd()], 1e12, "run it again")
    check_free_space([os.getcwd()], 0, "never said")


def test_min_free_space_comes_from_the_environment(monkeypatch):
    from abd_ray.study.diskspace import DEFAULT_MIN_FREE_MB, min_free_mb

    monkeypatch.delenv("ABD_RAY_MIN_FREE_MB", raising=False)
    assert min_free_mb() == DEFAULT_MIN_FREE_MB
    monkeypatch.setenv("ABD_RAY_MIN_FREE_MB", "12.5")
    assert min_free_mb() == 12.5
    for bad in ("lots", "-1"):
        monkeypatch.setenv("ABD_RAY_MIN_FREE_MB", bad)
        with pytest.raises(ValueError, match="ABD_RAY_MIN_FREE_MB"):
            min_free_mb()
