"""Helpers shared by the study tests (tests/test_study_run.py, tests/test_faults.py): tiny study files, the
agreement of Tune, Optuna and MLflow read back from a study folder, and driver subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

STUDY = {
    "name": "tiny",
    "mode": "search",
    "dataset": "digits",
    "attacks": ["badnet_grid"],
    "synthesizers": ["zskt"],
    "synth": {"zskt": {"n_s": 1}},
    "defenses": ["none"],
    "seeds": [0],
    "teacher": {"epochs": 2},
    "budget": {"steps": 12, "eval_every": 4, "batch_size": 32},
    "resources": {"cpu": 1},
    "max_concurrent": 2,
    "max_failures": 2,
    "search": {"defense": "abd", "sampler": "tpe", "num_samples": 2, "seed": 0,
               "space": {"coef": {"low": 0.1, "high": 5.0, "log": True}, "hg_out_portion": {"low": 0.01, "high": 0.1}}},
}


def write_study(tmp_path: Path, **over) -> Path:
    """A study file: STUDY with top-level keys replaced (a value of None removes the key)."""
    d = json.loads(json.dumps(STUDY))
    d.update(over)
    d = {k: v for k, v in d.items() if v is not None}
    f = tmp_path / f"{d['name']}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def agreement(study_dir: Path) -> dict:
    """The counts that must agree, read back from Tune's files, optuna.db and the MLflow database."""
    from abd_ray.study.report import build_report
    from abd_ray.tracking import Tracker

    rep = build_report(study_dir)
    st = json.loads((study_dir / "study.json").read_text())
    t = Tracker(st["tracking_uri"])
    runs = t.child_runs(st["mlflow_experiment_id"], st["parent_run_id"])
    steps = {r["trial_id"]: t.logged_steps(r["run_id"], "clean_acc") for r in runs}
    return {"report": rep, "counts": rep["counts"], "runs": runs, "steps": steps, "tracker": t, "state": st}


def check_agreement(study_dir: Path, planned: int, search: int = 0, steps: int = 12, failed: int = 0) -> dict:
    """Tune trials = Optuna trials = MLflow child runs = planned; ``failed`` of them failed in all three; nothing
    RUNNING; every finished run holds each evaluation step once, up to ``steps``."""
    a = agreement(study_dir)
    c = a["counts"]
    ok = planned - failed
    assert c["planned"] == planned
    assert c["tune"] == {k: v for k, v in {"TERMINATED": ok, "ERROR": failed}.items() if v}, c
    # Every Tune trial is one Optuna trial (searched ones in the cell's study, fixed ones in its grid study).
    assert c["optuna_total"] == {k: v for k, v in {"COMPLETE": ok, "FAIL": failed}.items() if v}, c
    assert c["mlflow"]["children"] == {k: v for k, v in {"FINISHED": ok, "FAILED": failed}.items() if v}, c
    assert c["mlflow"]["parent_status"] == "FINISHED"
    trial_ids = {r["trial_id"] for r in a["report"]["trials"]}
    assert {r["trial_id"] for r in a["runs"]} == trial_ids  # one run per trial, keyed by Tune's trial id
    status = {r["trial_id"]: r["status"] for r in a["report"]["trials"]}
    for tid, logged in list(a["steps"].items()):
        # Order may differ (a step that failed to log is replayed late); a step may not repeat.
        assert len(logged) == len(set(logged)), f"trial {tid} logged a step twice: {logged}"
        a["steps"][tid] = sorted(logged)
        if status[tid] == "TERMINATED":
            assert max(logged) == steps
    return a


def cli(*args: str) -> list[str]:
    """The argv of an ``abd-ray`` subprocess (through main(), which sees the plugin subcommands)."""
    return [sys.executable, "-c", "import sys; from abd_ray.cli import main; sys.exit(main())", *args]


def trial_dirs(study_dir: Path) -> list[Path]:
    """The trial folders of a study's Tune experiment (every folder in it: Tune's own files are files)."""
    return sorted(d for d in (study_dir / "tune").iterdir() if d.is_dir()) if (study_dir / "tune").exists() else []


def results(trial_dir: Path) -> list[dict]:
    """The results a trial has reported so far (its result.json lines)."""
    from abd_ray.study.sync import read_results

    return read_results(trial_dir)


def start_driver(argv: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start an ``abd-ray`` driver in a session of its own (so it and the Ray processes it starts are one group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cli(*argv), stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=cwd)


def kill_when(p: subprocess.Popen, cond: Callable[[], bool], log: Path, timeout: float = 240,
              sig: int = signal.SIGKILL, group: bool = True) -> None:
    """Send ``sig`` to the driver (its whole process group for SIGKILL) once ``cond()`` holds; fail if it never does."""
    deadline = time.time() + timeout
    hit = False
    try:
        while time.time() < deadline and p.poll() is None:
            if cond():
                if group:
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
                hit = True
                break
            time.sleep(0.1)
    finally:
        if not hit and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert hit, f"the condition never held (rc {p.poll()}):\n" + log.read_text()[-4000:]


def wait(p: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WORKER_PREFIX = re.compile(r"^\((?P<who>[^)]*pid=\d+)\)\s?")


def driver_tracebacks(text: str) -> list[str]:
    """The Python tracebacks in a driver's log, less the one a Ray worker may print when it is shut down.

    At ``ray.shutdown()`` the raylet sends SIGTERM to idle workers; when the signal lands inside a garbage
    collector callback, Ray's own handler raises ``SystemExit`` there and the interpreter prints it as an ignored
    exception, forwarded to the driver's log. That is Ray's exit path, not a failure of the study.
    """
    lines = [_ANSI.sub("", line) for line in text.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last):" not in line:
            continue
        prefix = _WORKER_PREFIX.match(line.strip())
        who = prefix.group("who") if prefix else None
        block = [line]
        for nxt in lines[i + 1:i + 40]:
            nxt_prefix = _WORKER_PREFIX.match(nxt.strip())
            if (nxt_prefix.group("who") if nxt_prefix else None) != who:
                break
            block.append(nxt)
        text_block = "\n".join(block)
        if who is not None and "sigterm_handler" in text_block and "SystemExit" in text_block:
            continue
        found.append(text_block)
    return found
