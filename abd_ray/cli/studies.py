"""The subcommands of studies: ``study``, ``resume``, ``report``, ``status`` and ``dashboard``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

VERBOSE_HELP = "Ray's own console output (its per-checkpoint lines and hints) instead of the study's table"


def set_verbosity(verbose: bool) -> None:
    """``-v``: Ray's own console output, in the driver and (through the environment) in a local Ray's workers."""
    from abd_ray.study.cluster import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"


def _print_end(rep: dict[str, Any], md: str) -> None:
    """The report, then where it is and how to open the study in MLflow (the last lines a user sees)."""
    from abd_ray.study.report import mlflow_lines

    print(md)
    print(f"report: {rep['files']['markdown']}")
    for line in mlflow_lines(rep["mlflow"]):
        print(line)


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run a study file (teachers, trials on Ray Tune + Optuna, MLflow tracking)")
    p.add_argument("file", help="a study file, e.g. studies/quickstart.yaml")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster: host:port of its head, or auto (its token from RAY_AUTH_TOKEN, "
                        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); default: start Ray here")
    p.add_argument("--storage", default=None,
                   help="storage root: a folder (shared storage on a cluster) or s3://...; default ./abd_ray_results")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)")
    p.add_argument("--name", default=None, help="study name (default: the file's name:)")
    p.add_argument("--cache", default=None, help="teacher cache root (default: $ABD_RAY_CACHE or .abd_ray/cache)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: a quick check that the study runs")
    p.add_argument("--max-acc-drop", type=float, default=5.0, help="allowed clean_acc drop of the recommendation")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)


def _check_drop(value: float) -> None:
    """--max-acc-drop is checked before a study starts (not when its report is written, hours later)."""
    import math

    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--max-acc-drop {value!r} must be a number >= 0 (percentage points), e.g. 5")


def _stopped(command: str, error: Exception) -> int:
    """A study stopped by its environment (a full disk): one line, and the exit status of an interruption."""
    print(f"abd-ray {command}: stopped: {error}", file=sys.stderr)
    return 1


def _run(command: str, args: argparse.Namespace, start) -> int:
    """Run or continue a study, then print its report; exit 1 when it stopped before every trial ended."""
    from abd_ray.study.diskspace import StorageFull
    from abd_ray.study.report import write_report

    _check_drop(args.max_acc_drop)
    set_verbosity(args.verbose)
    try:
        study_dir, finished = start()
    except StorageFull as e:
        return _stopped(command, e)
    _print_end(*write_report(study_dir, args.max_acc_drop))
    return 0 if finished else 1


def cmd_study(args: argparse.Namespace) -> int:
    from abd_ray.study.runner import launch

    return _run("study", args, lambda: launch(args.file, storage=args.storage, name=args.name,
                                              tracking_uri=args.tracking_uri, address=args.address,
                                              smoke=args.smoke, cache_dir=args.cache))


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue an interrupted study (finished trials are kept)")
    p.add_argument("dir", help="the study folder that `abd-ray study` printed")
    p.add_argument("--address", default=None, help="join a running Ray cluster (host:port of its head, or auto)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI, if it moved since the study began")
    p.add_argument("--max-acc-drop", type=float, default=5.0, help="allowed clean_acc drop of the recommendation")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)


def cmd_resume(args: argparse.Namespace) -> int:
    from abd_ray.study.runner import resume

    return _run("resume", args, lambda: resume(args.dir, address=args.address, tracking_uri=args.tracking_uri))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Pareto fronts, paper-style table, der and the recommended defended config")
    p.add_argument("dir", help="a study folder")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--max-acc-drop", type=float, default=5.0,
                   help="allowed drop of clean_acc (points) below the undefended run for the recommendation")


def cmd_report(args: argparse.Namespace) -> int:
    from abd_ray.study.report import jsonable, write_report

    rep, md = write_report(args.dir, args.max_acc_drop)
    if args.json:
        print(json.dumps(jsonable(rep), sort_keys=True))
    else:
        _print_end(rep, md)
    return 0


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="where a study stands (trials, best so far, driver, resume), without Ray")
    p.add_argument("dir", help="a study folder")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument("--max-acc-drop", type=float, default=5.0, help="allowed clean_acc drop of the best so far")
    p.add_argument("--no-mlflow", action="store_true", help="do not read the tracking database")


def cmd_status(args: argparse.Namespace) -> int:
    from abd_ray.study.report import jsonable
    from abd_ray.study.status import render_status, study_status

    _check_drop(args.max_acc_drop)
    st = study_status(args.dir, args.max_acc_drop, mlflow=not args.no_mlflow)
    print(json.dumps(jsonable(st), sort_keys=True) if args.json else render_status(st))
    return 0


def _add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard on 127.0.0.1 against a study's optuna.db "
                                         "(extra: pip install -e '.[dashboard]')")
    p.add_argument("dir", help="a study folder")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from abd_ray.study.folder import StudyFolder

    folder = StudyFolder(args.dir)
    folder.read_state()
    if not folder.optuna_db.exists():
        raise ValueError(f"{folder} has no optuna.db yet (its trials have not started); run the study first")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number; use 1-65535, e.g. 8080")
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ValueError("optuna-dashboard is not installed; install the extra with pip install -e '.[dashboard]' "
                         "(or pip install optuna-dashboard)") from None
    print(f"optuna-dashboard for {folder.path.name} on http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
    try:
        run_server(folder.optuna_url, host="127.0.0.1", port=args.port)
    except OSError as e:
        raise ValueError(f"cannot serve on 127.0.0.1:{args.port} ({e.strerror or e}); pick another --port") from None
    return 0


COMMANDS = {
    "study": (_add_study, cmd_study),
    "resume": (_add_resume, cmd_resume),
    "report": (_add_report, cmd_report),
    "status": (_add_status, cmd_status),
    "dashboard": (_add_dashboard, cmd_dashboard),
}
