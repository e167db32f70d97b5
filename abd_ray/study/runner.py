"""Launch and resume studies: the teacher stage, the Tune experiment, and the agreement of Tune, Optuna and MLflow.

A study lives in a *study folder* on the driver: ``study.json`` (the driver's record: spec, paths, tracking URI,
parent run, teachers, status), ``study.yaml`` (the study file as given), ``optuna.db`` (one Optuna study per
search cell), ``report/`` and, unless the storage is remote (``s3://``...), the Tune experiment ``tune/`` with
the trials' results and checkpoints.

Restore-or-new is decided by ``Tuner.can_restore`` on the experiment path; a fresh experiment first removes any
Optuna study of the same cells, so it never appends to the studies of an attempt that Tune could not restore.
One lock per study folder keeps two drivers off one study.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from abd_ray.study.cluster import ray_session
from abd_ray.study.diskspace import StorageFull, check_free_space, is_disk_full, min_free_mb, stopped_hint
from abd_ray.study.spec import StudySpec, load_spec

STATE = "study.json"
SPEC_COPY = "study.yaml"
EXPERIMENT = "tune"
DEFAULT_STORAGE = "abd_ray_results"
TERMINAL = ("TERMINATED", "ERROR")

log = logging.getLogger(__name__)
Echo = Callable[[str], None]


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _is_uri(path: str) -> bool:
    return "://" in path


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a folder or a storage URI; a URI's query string (``s3://bucket/runs?endpoint_override=
    host:9000&scheme=http``, the way pyarrow and Ray address MinIO and other S3-compatible stores) stays at the end."""
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_state(study_dir: str | Path) -> dict[str, Any]:
    """The ``study.json`` of a study folder (ValueError with a hint if the folder holds no study)."""
    p = Path(study_dir) / STATE
    if not p.exists():
        raise ValueError(f"{study_dir} holds no abd-ray study ({STATE} is missing); give the folder that "
                         "`abd-ray study` printed")
    return json.loads(p.read_text())


def write_state(study_dir: str | Path, state: dict[str, Any]) -> None:
    """Write ``study.json`` atomically (a driver killed mid-write leaves the previous one)."""
    p = Path(study_dir) / STATE
    tmp = p.with_name(f".{STATE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    os.replace(tmp, p)


def experiment_path(state: dict[str, Any]) -> str:
    return join_storage(state["storage"], EXPERIMENT)


LOCK = ".lock"
OWNER = ".lock.owner"


def lock(study_dir: str | Path) -> FileLock:
    """Take the study folder's lock, or raise a ValueError naming the folder (and the holder's pid) if another
    driver holds it. The lock is an OS file lock: a SIGKILLed driver releases it with its process."""
    lk = FileLock(str(Path(study_dir) / LOCK))
    try:
        lk.acquire(timeout=0)
    except Timeout:
        owner = Path(study_dir) / OWNER
        pid = owner.read_text().strip() if owner.exists() else "?"
        raise ValueError(f"study folder {study_dir} is in use by another abd-ray process (pid {pid}); wait for it "
                         "to end or stop it, then run `abd-ray resume` on the folder") from None
    (Path(study_dir) / OWNER).write_text(str(os.getpid()))
    return lk


def _check_room(paths: list[str]) -> None:
    """Refuse to start on a file system that is (nearly) full, before anything is written."""
    try:
        check_free_space(paths, min_free_mb(), "free space (or lower the limit), then run the command again")
    except StorageFull as e:
        raise ValueError(str(e)) from None


def _local_paths(study_dir: Path, tune_storage: str) -> list[str]:
    """The local folders a study writes: its folder and, unless it is remote, the Tune storage."""
    return [str(study_dir)] + ([] if _is_uri(tune_storage) else [tune_storage])


def spec_changes(old_text: str, new_text: str) -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs between two study files."""
    import yaml

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix or "(file)": d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    try:
        old, new = flat(yaml.safe_load(old_text)), flat(yaml.safe_load(new_text))
    except yaml.YAMLError:
        return ["(the edited file is not valid YAML)"]
    absent = "(absent)"
    return [f"{k}: {old.get(k, absent)} -> {new.get(k, absent)}" for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent)]


def check_spec_unchanged(study_dir: Path, state: dict[str, Any], echo: Echo) -> None:
    """One study, one spec: a resume runs the study file as it was at launch.

    Raises:
        ValueError: the folder's copy (``study.yaml``) was edited since launch; resuming would mix two specs.
    """
    copy = study_dir / SPEC_COPY
    launched = state.get("spec_source")
    if launched is None:  # a folder written before the launch-time source was recorded
        return
    saved = copy.read_text(errors="replace") if copy.exists() else ""
    if saved != launched:
        changes = "; ".join(spec_changes(launched, saved)[:6]) or "whitespace or comments only"
        raise ValueError(f"{copy} was edited since the study began ({changes}); a study runs one spec: restore it "
                         f"(the original is in {study_dir / STATE}, key spec_source), or run the edited file as a "
                         "new study with `abd-ray study FILE --name NEW`")
    original = Path(state.get("spec_file") or "")
    if original.is_file() and original.read_bytes() != launched.encode():
        changes = "; ".join(spec_changes(launched, original.read_text(errors="replace"))[:6]) or "comments only"
        echo(f"note: {original} changed since the study began ({changes}); resuming with the copy taken at launch, "
             f"{copy}; to run the edited file, start a new study: abd-ray study {original} --name NEW")


def _spec_from_state(study_dir: Path, state: dict[str, Any]) -> StudySpec:
    # Relative paths in the study file are relative to the folder the study was launched from.
    spec = load_spec(study_dir / SPEC_COPY, base_dir=state.get("cwd"))
    spec = dataclasses.replace(spec, name=state["name"])
    return spec.with_smoke() if state.get("smoke") else spec


# --- launch / resume ------------------------------------------------------------------------------------------------


def launch(
    spec_path: str | os.PathLike,
    *,
    storage: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    smoke: bool = False,
    cache_dir: str | None = None,
    echo: Echo = _echo,
) -> tuple[Path, bool]:
    """Validate a study file, create its study folder, and run the study.

    Returns:
        The study folder and whether every trial ended (False: interrupted, resume it).

    Raises:
        ValueError: a bad study file, or a folder that already holds the study (pointing to ``abd-ray resume``).
    """
    from abd_ray.study.spec import STUDY_NAME_RE
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
    if _is_uri(storage):
        study_dir = Path(DEFAULT_STORAGE).resolve() / spec.name
        tune_storage = join_storage(storage, spec.name)
    else:
        study_dir = Path(storage).expanduser().resolve() / spec.name
        tune_storage = str(study_dir)
    if (study_dir / STATE).exists():
        if (study_dir / LOCK).exists():
            lock(study_dir).release()  # a running driver holds it: say so rather than "resume it"
        raise ValueError(f"study folder {study_dir} already holds study {spec.name!r}; continue it with "
                         f"`abd-ray resume {study_dir}`, or start a new one with --name")
    if study_dir.exists() and any(p.name not in (LOCK, OWNER) for p in study_dir.iterdir()):
        raise ValueError(f"folder {study_dir} exists and is not empty; pick another --name or --storage")
    cache = cache_dir or spec.cache_dir or os.environ.get("ABD_RAY_CACHE") or ".abd_ray/cache"
    data_root = spec.data_root or os.environ.get("ABD_RAY_DATA")
    if spec.dataset != "digits":
        # Fail before any compute when the data is not there (the loader names the missing files).
        from abd_ray.data import load_dataset

        load_dataset(spec.dataset, data_root)
    from abd_ray.attacks import AttackSpec
    from abd_ray.cli import check_trigger

    for attack in spec.attacks:  # an unreadable pattern / mask file fails here, not in the teacher stage
        check_trigger(AttackSpec(**spec.teacher_spec_dict(attack)["attack"]), spec.dataset)
    if spec.teacher_file:
        # A teacher from elsewhere is checked before anything is created: weights-only, fitting its arch.
        _check_teacher_file(spec)
    check_trials(spec)
    _check_room(_local_paths(study_dir, tune_storage))
    # Ray before the folder: a cluster that cannot be joined leaves nothing behind to clean up.
    with ray_session(address, echo):
        study_dir.mkdir(parents=True, exist_ok=True)
        lk = lock(study_dir)
        try:
            if (study_dir / STATE).exists():  # another driver got here first, between our check and our lock
                raise ValueError(f"study folder {study_dir} already holds study {spec.name!r}; continue it with "
                                 f"`abd-ray resume {study_dir}`, or start a new one with --name")
            (study_dir / SPEC_COPY).write_text(spec.source)
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
                "cache_dir": cache if _is_uri(cache) else str(Path(cache).expanduser().resolve()),
                "data_root": str(Path(data_root).expanduser().resolve()) if data_root else None,
                "planned_trials": spec.planned_trials(),
                "attempts": 0,
            }
            write_state(study_dir, state)
            echo(f"study {spec.name}: {state['planned_trials']} trials; folder {study_dir}")
            return study_dir, _drive(study_dir, spec, state, echo)
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

    study_dir = Path(study_dir).expanduser().resolve()
    state = read_state(study_dir)
    check_spec_unchanged(study_dir, state, echo)
    _check_room(_local_paths(study_dir, state["storage"]))
    lk = lock(study_dir)  # before Ray: a folder in use is refused at once
    try:
        if tracking_uri is not None:
            state["tracking_uri"] = resolve_tracking_uri(tracking_uri)
        spec = _spec_from_state(study_dir, state)
        with ray_session(address, echo):
            echo(f"resuming study {spec.name} in {study_dir}")
            return study_dir, _drive(study_dir, spec, state, echo)
    finally:
        lk.release()


# --- the drive ------------------------------------------------------------------------------------------------------


def _tracking_setup(spec: StudySpec, state: dict[str, Any], study_dir: Path) -> None:
    from abd_ray.tracking import Tracker

    t = Tracker(state["tracking_uri"])
    exp_id = t.experiment(spec.name)
    state["mlflow_experiment_id"] = exp_id
    if not state.get("parent_run_id"):
        params = {"study.name": spec.name, "study.mode": spec.mode, "study.dataset": spec.dataset,
                  "study.attacks": ",".join(spec.attacks), "study.synthesizers": ",".join(spec.synthesizers),
                  "study.defenses": ",".join(spec.defenses), "study.seeds": ",".join(map(str, spec.seeds)),
                  "study.planned_trials": state["planned_trials"], "study.smoke": state.get("smoke", False),
                  "study.budget": json.dumps(spec.budget, sort_keys=True)}
        if spec.search is not None:
            params.update({"search.defense": spec.search.defense, "search.sampler": spec.search.sampler,
                           "search.num_samples": spec.search.num_samples,
                           "search.space": json.dumps({p.name: p.to_dict() for p in spec.search.space})})
        state["parent_run_id"] = t.start_parent(exp_id, spec.name, params, {"abd_ray.study_dir": str(study_dir)})
        t.log_artifact(state["parent_run_id"], study_dir / SPEC_COPY)
    elif t.status(state["parent_run_id"]) != "RUNNING":
        t.set_status(state["parent_run_id"], "RUNNING")
    write_state(study_dir, state)


def _check_teacher_file(spec: StudySpec) -> dict[str, Any]:
    """Load a study's ``teacher_file`` (weights-only, tensors checked against the arch) and return its metadata."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import load_external

    tspec = TeacherSpec.from_dict(spec.teacher_spec_dict(spec.attacks[0]))
    return load_external(spec.teacher_file, tspec).meta


def check_trials(spec: StudySpec) -> None:
    """Build the run config of every fixed trial, and of each search cell at every end of its space, as a trial
    would, so a setting that cannot run (e.g. more shuffled layers than the teacher has) fails before any compute."""
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import check_config
    from abd_ray.study.spec import split_config

    flats = spec.grid_configs()
    if spec.search is not None:
        for attack, synth in spec.search_cells():
            base = spec.base_config(attack, synth, spec.search.defense, spec.seeds[0], "search")
            base.update({f"defense.{k}": v for k, v in spec.search.fixed.items()})
            flats.append(base)
            for p in spec.search.space:
                ends = p.choices if p.choices is not None else (p.low, p.high)
                flats += [{**base, f"defense.{p.name}": int(v) if p.is_int else v} for v in ends]
    for flat in flats:
        try:
            check_config(RunConfig.from_flat(split_config(flat)[0]))
        except ValueError as e:
            where = "search" if flat.get("study.kind") == "search" else "defenses"
            raise ValueError(f"study {spec.name}: {where}: {flat['study.cell']}/{flat['defense']}: {e}") from None


def _teacher_task(spec_dict: dict[str, Any], cache_dir: str, data_root: str | None) -> dict[str, Any]:
    """A Ray task: the teacher of ``spec_dict`` from the cache, or trained once into it."""
    import ray

    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    t = get_teacher(TeacherSpec.from_dict(spec_dict), cache_dir, data_root, "auto", progress=False)
    return {"path": str(t.path), "metrics": t.metrics, "cached": t.cached, "key": t.meta.get("key"),
            "node_id": ray.get_runtime_context().get_node_id()}


def train_teachers(spec: StudySpec, state: dict[str, Any], echo: Echo) -> dict[str, dict[str, Any]]:
    """The teacher stage: each distinct teacher of the study as one Ray task (a GPU where the cluster has one)."""
    import ray

    if spec.teacher_file:
        meta = _check_teacher_file(spec)
        echo(f"teacher stage: the study's teacher_file {spec.teacher_file} (not trained)")
        return {spec.attacks[0]: {"path": spec.teacher_file, "metrics": meta.get("metrics", {}), "cached": False,
                                  "key": meta.get("key"), "external": True}}
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(_teacher_task).options(num_cpus=spec.cpu if not gpus else 1, num_gpus=1 if gpus else 0,
                                             max_retries=2)
    specs = {a: spec.teacher_spec_dict(a) for a in spec.attacks}
    refs = {a: task.remote(s, state["cache_dir"], state.get("data_root")) for a, s in specs.items()}
    echo(f"teacher stage: {len(refs)} teacher(s) ({'GPU' if gpus else 'CPU'})")
    out = {}
    for a, ref in refs.items():
        info = ray.get(ref)
        m = info["metrics"]
        echo(f"  {a:<12} clean_acc {m['clean_acc']:6.2f}  asr {m.get('asr', float('nan')):6.2f}  "
             f"{'cached' if info['cached'] else 'trained'}  {info['path']}")
        out[a] = info
    return out


def plan(spec: StudySpec, state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The fixed trials' configs and, per search cell, the constants of its search trials."""
    teachers = state["teachers"]

    def finish(flat: dict[str, Any]) -> dict[str, Any]:
        flat["teacher_file"] = teachers[flat["attack.name"]]["path"]
        flat["cache_dir"] = state["cache_dir"]
        flat["data_root"] = state.get("data_root")
        return flat

    fixed = [finish(c) for c in spec.grid_configs()]
    cells = {}
    if spec.search is not None:
        for attack, synth in spec.search_cells():
            base = finish(spec.base_config(attack, synth, spec.search.defense, spec.seeds[0], "search"))
            base.update({f"defense.{k}": v for k, v in spec.search.fixed.items()})
            cells[f"{attack}/{synth}"] = base
    return fixed, cells


def optuna_names(spec: StudySpec) -> list[str]:
    """Every Optuna study of a study: one per search cell, and one ``grid`` study per cell with fixed trials."""
    from abd_ray.study.search import grid_study_name, optuna_study_name

    names = [optuna_study_name(spec.name, f"{a}/{s}") for a, s in spec.search_cells()]
    names += [grid_study_name(spec.name, c) for c in sorted({c["study.cell"] for c in spec.grid_configs()})]
    return names


def _trainable(spec: StudySpec):
    import ray
    from ray import tune

    from abd_ray.study.trainable import train_trial

    gpu = spec.gpu
    if gpu > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        log.warning("resources.gpu=%s but the cluster has no GPU: trials run on CPU", gpu)
        gpu = 0
    return tune.with_resources(train_trial, {"cpu": spec.cpu, "gpu": gpu})


def _tuner(spec: StudySpec, state: dict[str, Any], study_dir: Path, echo: Echo):
    from ray import tune

    from abd_ray.study.callbacks import FreeSpaceGuard, MLflowTrialCallback, StudyReporter
    from abd_ray.study.cluster import VERBOSE_ENV
    from abd_ray.study.search import StudySearcher, cell_searchers, delete_studies
    from abd_ray.study.trainable import trial_dirname, trial_name

    # Ray's default console output ignores a progress reporter and prints a TensorBoard hint that does not apply
    # here: the study's own table unless `-v` asks for Ray's output (read by Tune when the experiment starts).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1" if os.environ.get(VERBOSE_ENV) == "1" else "0")
    trainable = _trainable(spec)
    path = experiment_path(state)
    if tune.Tuner.can_restore(path):
        echo(f"restoring the Tune experiment {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    fixed, cells = plan(spec, state)
    delete_studies(str(study_dir), optuna_names(spec))
    searchers = cell_searchers(spec, str(study_dir), cells) if cells else {}
    searcher = StudySearcher(fixed, searchers, spec.search.num_samples if spec.search else 0, spec.name,
                             str(study_dir))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=state["planned_trials"],
            # Required with a custom searcher: without it Tune keeps a single trial pending at a time.
            max_concurrent_trials=spec.max_concurrent,
            # A finished trial's worker process (torch and the engine imported, the dataset loaded) runs the next
            # trial of the same resources, instead of a fresh process per trial.
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=state["storage"],
            callbacks=[MLflowTrialCallback(str(study_dir)),
                       FreeSpaceGuard(_local_paths(study_dir, state["storage"]), str(study_dir), min_free_mb())],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=StudyReporter([p.name for p in spec.search.space] if spec.search else []),
            verbose=1,
        ),
    )


def _error_of(trial) -> str:
    """The last line of a failed trial's error file, read from the trial's folder in storage.

    Not ``trial.error_file``: that points into the driver's Ray session folder and raises once Ray is shut down
    (a report written after the study, or by ``abd-ray report``).
    """
    try:
        name = trial.run_metadata.error_filename or "error.txt"
    except Exception:  # noqa: BLE001 - older experiment states: Tune's default name
        name = "error.txt"
    for f in dict.fromkeys([Path(trial.path) / name, Path(trial.path) / "error.txt"]):
        try:
            lines = [x for x in f.read_text().strip().splitlines() if x.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1].strip()
    return "error (no error file in the trial folder)"


def tune_trials(path: str) -> list[dict[str, Any]]:
    """Every trial of a Tune experiment: id, status, config, last result, error (read without Ray running)."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(path)
    out = []
    for t in ea.trials:
        err = None
        if t.status == "ERROR":
            err = _error_of(t)
        out.append({"trial_id": t.trial_id, "status": t.status, "config": dict(t.config),
                    "last_result": dict(t.last_result or {}), "error": err, "path": t.path,
                    "num_failures": int(getattr(t, "num_failures", 0) or 0)})
    return out


def reconcile(spec: StudySpec, state: dict[str, Any], study_dir: Path, trials: list[dict[str, Any]],
              finished: bool) -> dict[str, int]:
    """Make MLflow and Optuna agree with Tune once the experiment has stopped.

    - finished: Optuna trials still RUNNING (asked by a killed driver, never saved by Tune) become FAIL; MLflow
      child runs of trials Tune does not know become KILLED and are deleted; a terminated trial's run is FINISHED
      (FAILED for an errored one); the parent run is FINISHED.
    - interrupted: runs of unfinished trials and the parent become KILLED, until ``abd-ray resume`` reopens them.
    """
    from abd_ray.study.search import close_orphans, record_errors
    from abd_ray.tracking import ORPHAN_TAG, Tracker

    t = Tracker(state["tracking_uri"])
    by_id = {tr["trial_id"]: tr for tr in trials}
    fixes = {"optuna_orphans": 0, "mlflow_orphans": 0, "mlflow_fixed": 0}
    seen: set[str] = set()
    for run in t.child_runs(state["mlflow_experiment_id"], state["parent_run_id"]):
        tr = by_id.get(run["trial_id"])
        if tr is None or run["trial_id"] in seen:
            if finished:
                t.set_tags(run["run_id"], {ORPHAN_TAG: "true"})
                t.set_status(run["run_id"], "KILLED")
                t.delete(run["run_id"])
                fixes["mlflow_orphans"] += 1
            continue
        seen.add(run["trial_id"])
        want = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(tr["status"], "KILLED")
        if want == "FINISHED" and not tr["last_result"].get("final"):
            want = "FAILED"
        if run["status"] != want and (finished or run["status"] == "RUNNING"):
            t.set_status(run["run_id"], want)
            fixes["mlflow_fixed"] += 1
    if finished:
        fixes["optuna_orphans"] = close_orphans(str(study_dir), optuna_names(spec))
        errors = {tr["trial_id"]: tr["error"] or "error" for tr in trials if tr["status"] == "ERROR"}
        fixes["optuna_errors"] = record_errors(str(study_dir), optuna_names(spec), errors)
    t.set_status(state["parent_run_id"], "FINISHED" if finished else "KILLED")
    return fixes


def _finish_tracking(spec: StudySpec, state: dict[str, Any], study_dir: Path, trials: list[dict[str, Any]],
                     finished: bool, echo: Echo) -> None:
    """Replay failed MLflow writes, then reconcile; an unreachable database is reported, never fatal."""
    from abd_ray.study.callbacks import TRACKING_ERRORS, replay_tracking_errors

    rep = replay_tracking_errors(study_dir, trials)
    if rep["replayed"]:
        echo(f"MLflow: {rep['replayed']} failed tracking write(s) replayed from Tune's records "
             f"({rep['steps']} metric step(s) logged late)")
    try:
        state["reconciled"] = reconcile(spec, state, study_dir, trials, finished)
    except Exception as e:  # noqa: BLE001 - the trials' results are safe in Tune's files; MLflow can catch up
        log.warning("MLflow reconciliation failed: %s: %s", type(e).__name__, e)
        rep["pending"] = rep["pending"] or 1
        with open(study_dir / TRACKING_ERRORS, "a") as f:
            f.write(json.dumps({"time": _now(), "hook": "reconcile", "trial_id": None,
                                "error": f"{type(e).__name__}: {e}"[:1000]}) + "\n")
    state["tracking"] = rep
    if rep["pending"]:
        from abd_ray.tracking import redact

        echo(f"MLflow at {redact(state['tracking_uri'])} could not be written ({rep['pending']} record(s) in "
             f"{study_dir / TRACKING_ERRORS}); the results are safe in Tune's files: run `abd-ray resume "
             f"{study_dir}` when the tracking database is reachable again to log them")


def _drive(study_dir: Path, spec: StudySpec, state: dict[str, Any], echo: Echo) -> bool:
    """Run the teacher stage and the trials on the Ray of the caller's session; True if every trial ended."""
    state["attempts"] = int(state.get("attempts", 0)) + 1
    state["status"] = "running"
    _tracking_setup(spec, state, study_dir)
    finished = False
    trials: list[dict[str, Any]] = []
    try:
        state["teachers"] = train_teachers(spec, state, echo)
        write_state(study_dir, state)
        tuner = _tuner(spec, state, study_dir, echo)
        tuner.fit()
    except KeyboardInterrupt:
        # Ctrl-C: Tune has saved the experiment (or the teacher stage was cut short); stop cleanly.
        echo("interrupted (Ctrl-C)")
    except Exception as e:
        if not is_disk_full(e):
            raise
        _stop_on_full_disk(study_dir, state, e)
    if tune_can_restore(experiment_path(state)):
        trials = tune_trials(experiment_path(state))
    done = [tr for tr in trials if tr["status"] in TERMINAL]
    finished = bool(trials) and len(done) >= state["planned_trials"] and len(done) == len(trials)
    _finish_tracking(spec, state, study_dir, trials, finished, echo)
    state["status"] = "finished" if finished else "interrupted"
    state["updated"] = _now()
    write_state(study_dir, state)
    if finished:
        errors = sum(tr["status"] == "ERROR" for tr in trials)
        echo(f"study {spec.name}: {len(done)} trials finished ({errors} failed); folder {study_dir}")
    else:
        echo(f"study {spec.name} stopped before every trial ended; continue it with: abd-ray resume {study_dir}")
    return finished


def _stop_on_full_disk(study_dir: Path, state: dict[str, Any], error: BaseException) -> None:
    """Record the study as interrupted where the disk still allows it, and raise :class:`StorageFull`."""
    state["status"] = "interrupted"
    state["updated"] = _now()
    try:
        write_state(study_dir, state)
    except OSError:
        pass  # study.json is written atomically: the previous one stays whole
    check_free_space(_local_paths(study_dir, state["storage"]), min_free_mb(), stopped_hint(str(study_dir)))
    first = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
    raise StorageFull(f"a write of the study met a full disk ({first}); {stopped_hint(str(study_dir))}") from None


def tune_can_restore(path: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(path)

