"""The study folder: where a study lives on the driver, and the one place that knows its files.

``study.json`` (the driver's record: spec source, paths, tracking URI, parent run, teachers, status), ``study.yaml``
(the study file as given), ``optuna.db`` (one Optuna study per search cell), ``tracking_errors.jsonl`` (MLflow
writes that failed, for the replay), ``report/`` and, unless the storage is remote (``s3://``...), the Tune
experiment ``tune/`` with the trials' results and checkpoints. One lock per folder keeps two drivers off one study.

Imports neither ray, optuna nor torch, so that ``abd-ray status`` stays quick.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from filelock import FileLock

    from abd_ray.study.spec import StudySpec

STATE = "study.json"
SPEC_COPY = "study.yaml"
OPTUNA_DB = "optuna.db"
TRACKING_ERRORS = "tracking_errors.jsonl"
TRACKING_REPLAYED = "tracking_errors.replayed.jsonl"
REPORT_DIR = "report"
EXPERIMENT = "tune"
LOCK = ".lock"
OWNER = ".lock.owner"


def is_uri(path: str) -> bool:
    return "://" in path


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a folder or a storage URI; a URI's query string (``s3://bucket/runs?endpoint_override=
    host:9000&scheme=http``, the way pyarrow and Ray address MinIO and other S3-compatible stores) stays at the end."""
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def experiment_path(state: dict[str, Any]) -> str:
    """Where the Tune experiment of a study is (a folder or a storage URI), from its ``study.json``."""
    return join_storage(state["storage"], EXPERIMENT)


def read_state(study_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``study.json`` of a study folder (see :meth:`StudyFolder.read_state`)."""
    return StudyFolder(study_dir).read_state()


class StudyFolder:
    """A study folder on the driver: its files, its ``study.json``, its lock and its spec.

    Args:
        path: the folder (made absolute).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # --- files ------------------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.path / STATE

    @property
    def spec_copy(self) -> Path:
        return self.path / SPEC_COPY

    @property
    def optuna_db(self) -> Path:
        return self.path / OPTUNA_DB

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.path}/{OPTUNA_DB}"

    @property
    def tracking_errors(self) -> Path:
        return self.path / TRACKING_ERRORS

    @property
    def tracking_replayed(self) -> Path:
        return self.path / TRACKING_REPLAYED

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def local_experiment(self) -> Path:
        """The Tune experiment folder inside the study folder (where it is when the storage is local)."""
        return self.path / EXPERIMENT

    def study_file(self) -> Path | None:
        """The copy of the study file, logged as an artifact of every run (None if it is gone)."""
        return self.spec_copy if self.spec_copy.exists() else None

    def local_paths(self, tune_storage: str) -> list[str]:
        """The local folders a study writes: this folder and, unless it is remote, the Tune storage."""
        return [str(self.path)] + ([] if is_uri(tune_storage) else [tune_storage])

    # --- state ------------------------------------------------------------------------------------------------------

    def holds_study(self) -> bool:
        return self.state_file.exists()

    def read_state(self) -> dict[str, Any]:
        """The folder's ``study.json`` (ValueError with a hint if the folder holds no study)."""
        if not self.state_file.exists():
            raise ValueError(f"{self.path} holds no abd-ray study ({STATE} is missing); give the folder that "
                             "`abd-ray study` printed")
        return json.loads(self.state_file.read_text())

    def write_state(self, state: dict[str, Any]) -> None:
        """Write ``study.json`` atomically (a driver killed mid-write leaves the previous one)."""
        tmp = self.state_file.with_name(f".{STATE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.state_file)

    def spec(self, state: dict[str, Any]) -> StudySpec:
        """The spec the study runs: the folder's copy of the study file, under the study's name, smoke budgets
        applied if it was launched with ``--smoke``."""
        from abd_ray.study.spec import load_spec

        # Relative paths in the study file are relative to the folder the study was launched from.
        spec = load_spec(self.spec_copy, base_dir=state.get("cwd"))
        spec = dataclasses.replace(spec, name=state["name"])
        return spec.with_smoke() if state.get("smoke") else spec

    # --- lock -------------------------------------------------------------------------------------------------------

    def lock(self) -> FileLock:
        """Take the folder's lock, or raise a ValueError naming the folder (and the holder's pid) if another driver
        holds it. The lock is an OS file lock: a SIGKILLed driver releases it with its process."""
        from filelock import FileLock, Timeout

        lk = FileLock(str(self.path / LOCK))
        try:
            lk.acquire(timeout=0)
        except Timeout:
            owner = self.path / OWNER
            pid = owner.read_text().strip() if owner.exists() else "?"
            raise ValueError(f"study folder {self.path} is in use by another abd-ray process (pid {pid}); wait for "
                             "it to end or stop it, then run `abd-ray resume` on the folder") from None
        (self.path / OWNER).write_text(str(os.getpid()))
        return lk

    def lock_exists(self) -> bool:
        return (self.path / LOCK).exists()

    def only_lock_files(self) -> bool:
        """True if the folder holds nothing but a lock left by a driver (or is empty)."""
        return all(p.name in (LOCK, OWNER) for p in self.path.iterdir())

    def driver_pid(self) -> int | None:
        """The pid of the driver holding the folder's lock, or None when no driver runs the study.

        Probed with a shared, non-blocking ``flock`` on the lock file opened read-only: it fails while a driver holds
        the exclusive lock, and otherwise is dropped at once, without creating or writing anything.
        """
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int((self.path / OWNER).read_text().strip())
            except (OSError, ValueError):
                return -1  # held, owner not yet written
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
