"""The ``study``, ``resume`` and ``report`` subcommands of ``abd-ray`` (registered with :mod:`abd_ray.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

from abd_ray.cli import register_command


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


def _check_drop(value: float) -> None:
    """--max-acc-drop is checked before a study starts (not when its report is written, hours later)."""
    import math

    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--max-acc-drop {value!r} must be a number >= 0 (percentage points), e.g. 5")


def _stopped(command: str, error: Exception) -> int:
    """A study stopped by its environment (a full disk): one line, and the exit status of an interruption."""
    print(f"abd-ray {command}: stopped: {error}", file=sys.stderr)
    return 1


def cmd_study(args: argparse.Namespace) -> int:
    from abd_ray.study.diskspace import StorageFull
    from abd_ray.study.report import write_report
    from abd_ray.study.runner import launch

    _check_drop(args.max_acc_drop)
    try:
        study_dir, finished = launch(args.file, storage=args.storage, name=args.name, tracking_uri=args.tracking_uri,
                                     address=args.address, smoke=args.smoke, cache_dir=args.cache)
    except StorageFull as e:
        return _stopped("study", e)
    _, md = write_report(study_dir, args.max_acc_drop)
    print(md)
    print(f"report: {study_dir}/report/report.md")
    return 0 if finished else 1


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue an interrupted study (finished trials are kept)")
    p.add_argument("dir", help="the study folder that `abd-ray study` printed")
    p.add_argument("--address", default=None, help="join a running Ray cluster (host:port of its head, or auto)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI, if it moved since the study began")
    p.add_argument("--max-acc-drop", type=float, default=5.0, help="allowed clean_acc drop of the recommendation")


def cmd_resume(args: argparse.Namespace) -> int:
    from abd_ray.study.diskspace import StorageFull
    from abd_ray.study.report import write_report
    from abd_ray.study.runner import resume

    _check_drop(args.max_acc_drop)
    try:
        study_dir, finished = resume(args.dir, address=args.address, tracking_uri=args.tracking_uri)
    except StorageFull as e:
        return _stopped("resume", e)
    _, md = write_report(study_dir, args.max_acc_drop)
    print(md)
    print(f"report: {study_dir}/report/report.md")
    return 0 if finished else 1


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Pareto fronts, paper-style table, der and the recommended ABD config")
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
        print(md)
    return 0


register_command("study", _add_study, cmd_study)
register_command("resume", _add_resume, cmd_resume)
register_command("report", _add_report, cmd_report)
