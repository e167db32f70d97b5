"""Search spaces and the study's searcher.

One Tune experiment runs a whole study, so that every trial shares one pool of workers, one progress table and
one restore. Its searcher, :class:`StudySearcher`, hands out the study's fixed trials first (the grid, e.g. the
undefended baselines), then asks one Ray ``OptunaSearch`` per attack x synthesizer cell, each with its own Optuna
study in the study folder's ``optuna.db``: multi-objective, ``clean_acc`` maximised and ``asr`` minimised.

Kept in a package module (not a script) because Tune pickles the searcher into the experiment, and a restore
must import it again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from abd_ray.study.folder import StudyFolder
from abd_ray.study.front import canonical
from abd_ray.study.spec import Param, SearchSpec, StudySpec, defense_defaults

METRICS = ["clean_acc", "asr"]
MODES = ["max", "min"]


class SearchSpace:
    """A define-by-run search space over one defense's hyperparameters (no computation in it).

    Called with an Optuna trial, it suggests the searched hyperparameters as their keys (``defense.<name>``; a
    switch as ``study.<name>``): first the unconditional ones, then each conditional one whose ``when`` holds, so
    a trial never carries (and the sampler never models) a parameter that does nothing. It returns the rest of the
    trial's flat config as constants, which ``OptunaSearch`` merges into the config: with a switch off, the
    defense it switches to, without the constants that defense does not take.

    Args:
        params: the searched hyperparameters.
        constants: the flat config every trial of the cell shares (including fixed defense values).
        search: the search section (its switches); None: no switch.
    """

    def __init__(self, params: tuple[Param, ...], constants: dict[str, Any], search: SearchSpec | None = None) -> None:
        self.params = params
        self.constants = constants
        self.search = search

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for p in sorted(self.params, key=lambda q: bool(q.when)):  # stable: the file's order within each group
            if not p.active(values):
                continue
            if p.choices is not None:
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
            elif p.is_int:
                values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                values[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
        return self.search.trial_config(self.constants, values) if self.search is not None else dict(self.constants)


def auto_startup_trials(num_samples: int) -> int:
    """Random start-up trials for TPE and GP: a third of the budget, at least 2 and at most Optuna's default 10."""
    return max(2, min(10, num_samples // 3))


def make_sampler(search: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by the study file.

    Parallel trials: TPE uses its constant liar; Optuna's GP sampler conditions on the running trials itself;
    NSGA-II draws each child of a generation independently and random needs nothing.

    TPE is made multivariate (the defense's hyperparameters interact); TPE and GP model the results after
    ``startup_trials`` random ones (by default a third of the budget: Optuna's 10 would leave a study of 8 trials
    random); NSGA-II gets a small population, since its default of 50 would spend a whole small budget on random
    initial trials.
    """
    startup = search.startup_trials or auto_startup_trials(search.num_samples)
    if search.sampler == "tpe":
        # constant_liar: trials still running count as bad results, so parallel workers get different proposals;
        # group: a conditional space is modelled per set of parameters that occur together.
        with warnings.catch_warnings():  # ``group`` is marked experimental; it is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(multivariate=True, n_startup_trials=startup, seed=search.seed,
                                              constant_liar=True, group=any(p.when for p in search.space))
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=search.population_size, seed=search.seed)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=startup, seed=search.seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    raise ValueError(f"unknown sampler {search.sampler!r}; allowed: tpe, nsga2, gp, random")


def optuna_study_name(study: str, cell: str) -> str:
    return f"{study}:{cell}"


def grid_study_name(study: str, cell: str) -> str:
    return f"{study}:{cell}:grid"


def default_point(spec: SearchSpec) -> dict[str, Any]:
    """The searched hyperparameters at the defense's defaults, by key (a switch: on)."""
    defaults = defense_defaults(spec.defense)
    out = {}
    for p in spec.space:
        if p.key.startswith("study."):
            if True in p.choices:
                out[p.key] = True
            continue
        d = defaults.get(p.name)
        numeric = isinstance(d, (int, float)) and not isinstance(d, bool)
        # A symbolic default ("auto") outside a numeric range is left to the sampler rather than forced in.
        if p.name in defaults and ((p.choices is not None and d in p.choices) or (p.choices is None and numeric)):
            out[p.key] = d
    return out


def cell_searchers(spec: StudySpec, study_dir: str, constants: dict[str, dict[str, Any]]) -> dict[str, OptunaSearch]:
    """One OptunaSearch per search cell, each with its own study in ``optuna.db``.

    Args:
        spec: the study.
        study_dir: the study folder (local path).
        constants: per cell (``attack/synth``), the flat config shared by its trials.
    """
    assert spec.search is not None
    storage = optuna.storages.RDBStorage(StudyFolder(study_dir).optuna_url)
    out = {}
    # No more than the budget: an enqueued point never asked for would stay WAITING in Optuna.
    points = spec.search.warm_start(default_point(spec.search))[: spec.search.num_samples]
    for cell, const in constants.items():
        out[cell] = OptunaSearch(
            space=SearchSpace(spec.search.space, const, spec.search),
            metric=list(METRICS),
            mode=list(MODES),
            points_to_evaluate=[dict(p) for p in points] or None,
            sampler=make_sampler(spec.search),
            study_name=optuna_study_name(spec.name, cell),
            storage=storage,
        )
    return out


# --- deterministic trials: a proposal equal to a finished trial is answered from it -----------------------------

REUSED_FROM = "study.reused_from"  # the config key (and Optuna user attr ``reused_from``) naming the source trial
REUSED_RESULT = "study.reused_result"  # the source's final record (JSON), which the trainable reports as its own
# What a trial's results do not depend on: the study layer, the command line and the tracking code.
_NOT_SCIENCE = ("study", "cli", "tracking.py")


@functools.lru_cache(maxsize=1)
def science_hash() -> str:
    """A hash of the library's code that computes a trial's results (every module but the study layer, the CLI
    and the tracking), so that a result recorded before the science changed is not reused after."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] not in _NOT_SCIENCE:
            h.update(str(rel).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def trial_key(config: dict[str, Any]) -> str:
    """The resolved config of a trial, as a hash: its run config and fault keys (not the study's bookkeeping), the
    defense's hyperparameters completed by the defense's defaults (a moot parameter is never suggested, so it is
    not there), and :func:`science_hash`. Trials are deterministic: equal keys give equal results."""
    run = {k: canonical(v) for k, v in config.items() if not k.startswith("study.")}
    for k, v in defense_defaults(str(config.get("defense"))).items():
        run.setdefault(f"defense.{k}", canonical(v))
    doc = json.dumps({"config": run, "science": science_hash()}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def final_record(result: dict[str, Any]) -> dict[str, Any]:
    """What a reused trial reports: the source's final metrics and step, without Tune's bookkeeping."""
    from abd_ray.study.sync import TUNE_KEYS

    out = {k: v for k, v in result.items() if k not in TUNE_KEYS and isinstance(v, (int, float))
           and not isinstance(v, bool) and k not in ("reused", "resumed_from")}
    return {**out, "step": result.get("step"), "final": 1}


class ReuseStore:
    """Finished trials by :func:`trial_key`, shared by studies (a JSON-lines file), so that a rerun of a
    benchmark pays only for trials whose resolved config or science changed.

    Equal keys give equal results on one kind of chip only (:mod:`abd_ray.engine.repro`), so each record holds the
    chip and torch it was computed with, and a store answers only with the records of this machine's.

    Args:
        path: the file; created on the first record.
        device: where the trials run here, ``"cpu"`` or ``"cuda"`` (a study's resources: GPUs or none).
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        self.path = str(path)
        self.device = device

    def platform(self) -> str:
        """The chip and torch of this machine's trials: what a record must have been computed with to answer."""
        import torch

        from abd_ray.engine.repro import processor

        dev = torch.device("cuda" if self.device == "cuda" and torch.cuda.is_available() else "cpu")
        return f"{processor(dev)}; torch {torch.__version__}"

    def read(self) -> dict[str, dict[str, Any]]:
        out = {}
        here = self.platform()
        p = Path(self.path)
        for line in p.read_text().splitlines() if p.exists() else []:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed driver
            if rec.get("platform") == here:
                out[rec["key"]] = rec
        return out

    def add(self, key: str, source: str, result: dict[str, Any]) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        rec = {"key": key, "source": source, "result": result, "platform": self.platform()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


class StudySearcher(Searcher):
    """Issues a study's trials: its fixed trials and each cell's Optuna search until it has its ``num_samples``.

    Order: the defended fixed trials, then the searches, then the undefended fixed trials: the undefended trials are
    the cheapest (no vaccine, no SR), so longest first leaves them to fill the last worker slots.

    A trial whose :func:`trial_key` equals that of a finished trial (of this study, or of ``reuse_store``) is
    issued with :data:`REUSED_FROM` / :data:`REUSED_RESULT`: the trainable reports the source's result at once,
    so it is a trial in Tune, Optuna and MLflow with no compute, and the report counts its point once.

    Args:
        fixed: flat configs of the fixed (grid) trials.
        cells: OptunaSearch per cell.
        num_samples: search trials per cell.
        study: the study's name.
        study_dir: the study folder (its ``optuna.db``).
        reuse_store: a :class:`ReuseStore` file of finished trials shared with other studies.
        device: where the trials run, ``"cpu"`` or ``"cuda"``: the records of ``reuse_store`` that may answer.
    """

    def __init__(self, fixed: list[dict[str, Any]], cells: dict[str, OptunaSearch], num_samples: int,
                 study: str = "", study_dir: str | None = None, reuse_store: str | None = None,
                 device: str = "cpu") -> None:
        super().__init__(metric=None, mode=None)
        self.fixed = sorted(fixed, key=lambda c: c.get("defense") == "none")  # stable: the grid's order otherwise
        self.cells = cells
        self.num_samples = num_samples
        self.study = study
        self.study_dir = study_dir
        self.next_fixed = 0
        self.issued = {c: 0 for c in cells}
        self.owner: dict[str, str | None] = {}  # trial id -> cell (None: a fixed trial)
        self.fixed_of: dict[str, int] = {}  # trial id -> index into ``fixed``
        self.reuse_store = reuse_store
        self.device = device
        # trial key -> {"source", "result"}: this study's finished trials and the store's
        self.finished: dict[str, dict[str, Any]] = ReuseStore(reuse_store, device).read() if reuse_store else {}
        self.key_of: dict[str, str] = {}  # trial id -> trial key
        self.reused_of: dict[str, str] = {}  # trial id -> the trial it reuses

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The objectives live on the per-cell searchers; Tune's single metric/mode is not used.
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.owner:  # Tune asking again for a trial it already has a config for
            return None
        pending = sorted((n, c) for c, n in self.issued.items() if n < self.num_samples)
        if self.next_fixed < len(self.fixed) and (not pending or self.fixed[self.next_fixed].get("defense") != "none"):
            cfg = dict(self.fixed[self.next_fixed])
            self.fixed_of[trial_id] = self.next_fixed
            self.next_fixed += 1
            self.owner[trial_id] = None
            return self._answer(trial_id, cfg)
        if not pending:
            return Searcher.FINISHED
        # Round-robin over cells, so every cell's search advances while trials run in parallel.
        cell = pending[0][1]
        cfg = self.cells[cell].suggest(trial_id)
        if cfg is None:
            return None
        cfg = self._answer(trial_id, cfg)
        attrs = {"reused_from": cfg[REUSED_FROM]} if REUSED_FROM in cfg else {}
        self._tag_last_trial(optuna_study_name(self.study, cell), trial_id, attrs)
        self.issued[cell] += 1
        self.owner[trial_id] = cell
        return cfg

    def _answer(self, trial_id: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """The config of a trial, marked as reused when a finished twin answers it."""
        key = trial_key(cfg)
        self.key_of[trial_id] = key
        twin = self.finished.get(key)
        if twin is None:
            return cfg
        self.reused_of[trial_id] = twin["source"]
        return {**cfg, REUSED_FROM: twin["source"], REUSED_RESULT: json.dumps(twin["result"], sort_keys=True)}

    def _remember(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record a finished trial that ran (not a reused one) as the answer to its twins."""
        key = self.key_of.get(trial_id)
        if key is None or trial_id in self.reused_of or key in self.finished:
            return
        source = f"{self.study}/{trial_id}"
        rec = final_record(result)
        self.finished[key] = {"source": source, "result": rec}
        if self.reuse_store:
            ReuseStore(self.reuse_store, self.device).add(key, source, rec)

    def _tag_last_trial(self, study_name: str, trial_id: str, attrs: dict[str, Any] | None = None) -> None:
        """Tag the Optuna trial just asked for with Tune's id, so a failure's reason can be attached to it later
        (:func:`record_errors`). The searcher runs in the driver alone: the one is the cell's newest running trial
        that no Tune trial has claimed."""
        if self.study_dir is None:
            return
        storage = optuna.storages.RDBStorage(StudyFolder(self.study_dir).optuna_url)
        sid = storage.get_study_id_from_name(study_name)
        running = [t for t in storage.get_all_trials(sid, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if "tune_trial_id" not in t.user_attrs]
        if running:
            number = max(t.number for t in running)
            tid = storage.get_trial_id_from_study_id_trial_number(sid, number)
            for k, v in {"tune_trial_id": trial_id, **(attrs or {})}.items():
                storage.set_trial_user_attr(tid, k, v)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Multi-objective Optuna takes no intermediate values, and no pruner runs here (a trial stopped early would
        # be recorded with partial values and pollute the Pareto front).
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ok = bool(not error and result is not None and all(isinstance(result.get(m), (int, float)) for m in METRICS)
                  and result.get("final"))
        if ok:
            self._remember(trial_id, result)
        if trial_id in self.fixed_of:
            self._record_fixed(trial_id, result if ok else None)
            return
        cell = self.owner.get(trial_id)
        if cell is None:
            return
        # A failed trial is told as FAIL, not as COMPLETE with the values of its last evaluation.
        self.cells[cell].on_trial_complete(trial_id, result if ok else None, error=not ok)

    def _record_fixed(self, trial_id: str, result: dict | None) -> None:
        """Record a finished fixed trial in its cell's ``grid`` Optuna study (once per Tune trial id).

        So every Tune trial of a study has one Optuna trial (COMPLETE, or FAIL with no values), and the fixed
        baselines sit beside the searched points when the studies are read with Optuna's own tools.
        """
        if self.study_dir is None:
            return
        cfg = self.fixed[self.fixed_of[trial_id]]
        storage = optuna.storages.RDBStorage(StudyFolder(self.study_dir).optuna_url)
        study = optuna.create_study(study_name=grid_study_name(self.study, cfg["study.cell"]), storage=storage,
                                    directions=["maximize" if m == "max" else "minimize" for m in MODES],
                                    load_if_exists=True)
        if any(t.user_attrs.get("tune_trial_id") == trial_id for t in study.get_trials(deepcopy=False)):
            return  # already recorded (a restored experiment completing a trial a second time)
        dists = {
            "defense": optuna.distributions.CategoricalDistribution(sorted({c["defense"] for c in self.fixed})),
            "seed": optuna.distributions.CategoricalDistribution(sorted({c["seed"] for c in self.fixed})),
        }
        params = {"defense": cfg["defense"], "seed": cfg["seed"]}
        attrs = {"tune_trial_id": trial_id, "kind": "grid"}
        if trial_id in self.reused_of:
            attrs["reused_from"] = self.reused_of[trial_id]
        if result is not None:
            t = optuna.trial.create_trial(params=params, distributions=dists, user_attrs=attrs,
                                          values=[float(result[m]) for m in METRICS],
                                          state=optuna.trial.TrialState.COMPLETE)
        else:
            t = optuna.trial.create_trial(params=params, distributions=dists, user_attrs=attrs,
                                          state=optuna.trial.TrialState.FAIL)
        study.add_trial(t)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            # trusted: the searcher's own state in the study folder, beside Ray's pickled experiment state
            state = pickle.load(f)  # safe-load: written by this driver, not user input
        # A searcher saved before it kept finished trials answers no twin from them, and runs as before.
        self.__dict__.update({"reuse_store": None, "device": "cpu", "finished": {}, "key_of": {}, "reused_of": {},
                             **state})


def close_orphans(study_dir: str, study_names: list[str]) -> int:
    """Mark trials still RUNNING in the cells' Optuna studies as FAIL; returns how many.

    Called only once every Tune trial has ended: an Optuna trial still RUNNING then belongs to a driver that was
    killed after asking Optuna but before Tune saved that trial, and the restored searcher asked again instead.
    """
    storage = optuna.storages.RDBStorage(StudyFolder(study_dir).optuna_url)
    n = 0
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    for name in study_names:
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.set_user_attr(f"orphan_{t.number}", "RUNNING when its driver was killed; closed as FAIL")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            n += 1
    return n


def record_errors(study_dir: str, study_names: list[str], errors: dict[str, str]) -> int:
    """Attach the reason of each failed Tune trial to its Optuna study (user attr ``error.<tune trial id>``).

    A finished Optuna trial takes no new attributes, so the reason goes on the study, keyed by the Tune trial id
    that the failed trial carries as its ``tune_trial_id`` attribute. Returns how many reasons were attached.
    """
    if not errors or not StudyFolder(study_dir).optuna_db.exists():
        return 0
    storage = optuna.storages.RDBStorage(StudyFolder(study_dir).optuna_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    n = 0
    for name in study_names:
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            tid = t.user_attrs.get("tune_trial_id")
            if tid in errors and study.user_attrs.get(f"error.{tid}") != errors[tid]:
                study.set_user_attr(f"error.{tid}", errors[tid])
                n += 1
    return n


def delete_studies(study_dir: str, study_names: list[str]) -> None:
    """Remove the cells' Optuna studies (before a fresh Tune experiment, so it never appends to old ones)."""
    storage = optuna.storages.RDBStorage(StudyFolder(study_dir).optuna_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    for name in study_names:
        if name in existing:
            optuna.delete_study(study_name=name, storage=storage)


def optuna_counts(study_dir: str, study_names: list[str]) -> dict[str, dict[str, int]]:
    """Trials per state of each cell's Optuna study."""
    if not StudyFolder(study_dir).optuna_db.exists():
        return {}
    storage = optuna.storages.RDBStorage(StudyFolder(study_dir).optuna_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    out = {}
    for name in study_names:
        if name not in existing:
            continue
        counts: dict[str, int] = {}
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        out[name] = counts
    return out
