"""Free space for a study: a study stops while its folder's file system can still hold what it must save.

A checkpoint, Tune's experiment state or an Optuna commit that meets a full disk fails half-way (Tune then fails the
trial, Optuna's SQLite storage raises). So the driver checks the free space of the study folder (and of a local
Tune storage) before it starts and every few Tune steps, and stops, like an interruption, once less than
``ABD_RAY_MIN_FREE_MB`` (default 100) is left: finished trials stay intact and ``abd-ray resume`` continues once
space is freed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

MIN_FREE_ENV = "ABD_RAY_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 100.0  # several checkpoints of a 32x32 trial and Tune's experiment state, with room to spare


class StorageFull(RuntimeError):
    """The study's file system is (nearly) full; the message says where, how much is free, and how to go on."""


def min_free_mb() -> float:
    """The free space a study keeps, in MiB (``$ABD_RAY_MIN_FREE_MB``, else the default)."""
    raw = os.environ.get(MIN_FREE_ENV)
    if raw is None:
        return DEFAULT_MIN_FREE_MB
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MIN_FREE_ENV}={raw!r} is not a number of MiB, e.g. {DEFAULT_MIN_FREE_MB:g}") from None
    if value < 0:
        raise ValueError(f"{MIN_FREE_ENV}={raw!r} must be >= 0 (MiB)")
    return value


def stopped_hint(study_dir: str) -> str:
    return f"the study stopped with its finished trials intact: free space, then run `abd-ray resume {study_dir}`"


def check_free_space(paths: list[str], need_mb: float, then: str) -> None:
    """Raise :class:`StorageFull` if the file system of any of ``paths`` has less than ``need_mb`` MiB free.

    Args:
        paths: local folders (one not made yet is judged by its nearest existing parent).
        need_mb: the free space to keep, in MiB.
        then: what the user should do, the end of the message.
    """
    for path in paths:
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent  # a folder not made yet: its nearest existing parent's file system
        free = shutil.disk_usage(p).free / 2**20
        if free < need_mb:
            raise StorageFull(
                f"the file system of {path} has {free:.1f} MiB free, under the {need_mb:g} MiB a study keeps free "
                f"({MIN_FREE_ENV}); {then}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception in its chain is a full disk (ENOSPC, or SQLite's 'disk is full')."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageFull) or isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "database or disk is full" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
