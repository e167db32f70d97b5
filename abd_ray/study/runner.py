"""Launch and resume studies: pre-flight, the study folder, Ray, then the teacher stage, the Tune experiment and
the reconciliation of Tune, Optuna and MLflow (each in its own module)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abd_ray.study.cluster import ray_session
from abd_ray.study.diskspace import StorageFull, check_free_space, is_disk_full, min_free_mb, stopped_hint
from abd_ray.study.folder import StudyFolder, is_uri, join_storage
from abd_ray.study.preflight import check_room, check_spec, check_spec_unchanged
from abd_ray.study.reconcile import finish_tracking, start_tracking
from abd_ray.study.spec import STUDY_NAME_RE, StudySpec, load_spec
from abd_ray.study.teachers import train_teachers
from abd_ray.study.tuner import TERMINAL, make_tuner, study_trials

DEFAULT_STORAGE = "abd_ray_results"

log = logging.getLogger(__name__)
Echo = Callable[[str], None]


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _already_there(folder: StudyFolder, name: str) -> ValueError:
    return ValueError(f"study folder {folder} already holds study {name!r}; continue it with "
                      f"`abd-ray resume {folder}`, or start a new one with --name")


def launch(
    spec_path: str | os.PathLike,
    *,
    storage: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    smoke: bool = False,
    cache_dir: str | None = None,
    reuse_store: str | None = None,
    echo: Echo = _echo,
) -> tuple[Path, bool]:
    """Validate a study file, create its study folder, and run the study.

    Args:
        reuse_store: a file of finished trials by resolved config, shared with other studies: a trial equal to one
            of them is answered from it (see :class:`~abd_ray.study.search.ReuseStore`); the study's own finished
            trials answer their twins either way.

    Returns:
        The study folder and whether every trial ended (False: interrupted, resume it).

    Raises:
        ValueError: a bad study file, or a folder that already holds the study (pointing to ``abd-ray resume``).
    """
    from abd_ray.tracking import resolve_tracking_uri

    spec = load_spec(spec_path)
    if name is not None:
        if not STUDY_NAME_RE.match(name) or ".." in name:
            raise ValueError(f"--name {name!r} is not a valid study name; use letters, digits, '-', '_', '.'")
        spec = dataclasses.replace(spec, name=name)
    if smoke:
        spec = spec.with_smoke()
    uri = resolve_tracking_uri(tracking_uri)
    storage = storage or os.environ.get("ABD_RAY_STORAGE") or DEFAULT_STORAGE
    if is_uri(storage):
        folder = StudyFolder(Path(DEFAULT_STORAGE) / spec.name)
        tune_storage = join_storage(storage, spec.name)
    else:
        folder = StudyFolder(Path(storage).expanduser() / spec.name)
        tune_storage = str(folder)
    if folder.holds_study():
        if folder.lock_exists():
            folder.lock().release()  # a running driver holds it: say so rather than "resume it"
        raise _already_there(folder, spec.name)
    if folder.path.exists() and not folder.only_lock_files():
        raise ValueError(f"folder {folder} exists and is not empty; pick another --name or --storage")
    cache = cache_dir or spec.cache_dir or os.environ.get("ABD_RAY_CACHE") or ".abd_ray/cache"
    data_root = spec.data_root or os.environ.get("ABD_RAY_DATA")
    check_spec(spec, data_root)
    check_room(folder.local_paths(tune_storage))
    # Ray before the folder: a cluster that cannot be joined leaves nothing behind to clean up.
    with ray_session(address, echo):
        folder.path.mkdir(parents=True, exist_ok=True)
        lk = folder.lock()
        try:
            if folder.holds_study():  # another driver got here first, between our check and our lock
                raise _already_there(folder, spec.name)
            folder.spec_copy.write_text(spec.source)
            state = {
                "format": "abd-ray-study/1",
                "name": spec.name,
                "created": _now(),
                "status": "created",
                "smoke": smoke,
                "spec_file": str(Path(spec_path).resolve()),
                "spec_source": spec.source,
                "cwd": os.getcwd(),
                "storage": tune_storage,
                "tracking_uri": uri,
                "cache_dir": cache if is_uri(cache) else str(Path(cache).expanduser().resolve()),
                "data_root": str(Path(data_root).expanduser().resolve()) if data_root else None,
                "planned_trials": spec.planned_trials(),
                "reuse_store": str(Path(reuse_store).expanduser().resolve()) if reuse_store else None,
                "attempts": 0,
            }
            folder.write_state(state)
            echo(f"study {spec.name}: {state['planned_trials']} trials; folder {folder}")
            return folder.path, _drive(folder, spec, state, echo)
        finally:
            lk.release()


def resume(
    study_dir: str | os.PathLike,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    echo: Echo = _echo,
) -> tuple[Path, bool]:
    """Continue an interrupted study: finished trials are kept, unfinished ones restart from their checkpoints."""
    from abd_ray.tracking import resolve_tracking_uri

    folder = StudyFolder(study_dir)
    state = folder.read_state()
    check_spec_unchanged(folder, state, echo)
    check_room(folder.local_paths(state["storage"]))
    lk = folder.lock()  # before Ray: a folder in use is refused at once
    try:
        if tracking_uri is not None:
            state["tracking_uri"] = resolve_tracking_uri(tracking_uri)
        spec = folder.spec(state)
        with ray_session(address, echo):
            echo(f"resuming study {spec.name} in {folder}")
            return folder.path, _drive(folder, spec, state, echo)
    finally:
        lk.release()


def _drive(folder: StudyFolder, spec: StudySpec, state: dict[str, Any], echo: Echo) -> bool:
    """Run the teacher stage and the trials on the Ray of the caller's session; True if every trial ended."""
    state["attempts"] = int(state.get("attempts", 0)) + 1
    state["status"] = "running"
    start_tracking(spec, state, folder)
    try:
        state["teachers"] = train_teachers(spec, state, echo)
        folder.write_state(state)
        make_tuner(spec, state, folder, echo).fit()
    except KeyboardInterrupt:
        # Ctrl-C: Tune has saved the experiment (or the teacher stage was cut short); stop cleanly.
        echo("interrupted (Ctrl-C)")
    except Exception as e:
        if not is_disk_full(e):
            raise
        _stop_on_full_disk(folder, state, e)
    trials = study_trials(state)
    done = [tr for tr in trials if tr["status"] in TERMINAL]
    finished = bool(trials) and len(done) >= state["planned_trials"] and len(done) == len(trials)
    finish_tracking(spec, state, folder, trials, finished, echo, _now())
    state["status"] = "finished" if finished else "interrupted"
    state["updated"] = _now()
    folder.write_state(state)
    if finished:
        errors = sum(tr["status"] == "ERROR" for tr in trials)
        echo(f"study {spec.name}: {len(done)} trials finished ({errors} failed); folder {folder}")
    else:
        echo(f"study {spec.name} stopped before every trial ended; continue it with: abd-ray resume {folder}")
    return finished


def _stop_on_full_disk(folder: StudyFolder, state: dict[str, Any], error: BaseException) -> None:
    """Record the study as interrupted where the disk still allows it, and raise :class:`StorageFull`."""
    state["status"] = "interrupted"
    state["updated"] = _now()
    try:
        folder.write_state(state)
    except OSError:
        pass  # study.json is written atomically: the previous one stays whole
    check_free_space(folder.local_paths(state["storage"]), min_free_mb(), stopped_hint(str(folder)))
    first = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
    raise StorageFull(f"a write of the study met a full disk ({first}); {stopped_hint(str(folder))}") from None

