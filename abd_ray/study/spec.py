"""Study files: YAML in, a validated :class:`StudySpec` out, and the trials it plans.

A study file names one dataset and the axes of a study (attacks, synthesizers, defenses, seeds), the teacher and
student, the budget and the resources of a trial. In ``grid`` mode every combination runs; in ``search`` mode the
listed defenses still run as fixed baselines, and Optuna searches the hyperparameters of one defense
(ALGORITHMS.md section 4.3) in one Optuna study per attack x synthesizer cell.

Every check runs here, before Ray starts, and every error names the bad key and what is allowed. This module
imports neither ray nor optuna, so validation stays fast and usable from the CLI and from tests.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("grid", "search")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
# Defaults for --smoke: enough steps for two evaluations, a teacher of a few epochs, one seed.
SMOKE_DEFAULTS = {"steps": 40, "eval_every": 20, "teacher_epochs": 3, "num_samples": 2}
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

_TOP_KEYS = {
    "name": "study name: the folder under the storage root and the MLflow experiment",
    "description": "free text",
    "mode": "grid | search",
    "dataset": "one registered dataset",
    "data_root": "folder of the torchvision datasets",
    "attacks": "list of attack names (or 'none' for a clean teacher)",
    "attack": "common attack settings: target, poison_ratio, seed, pattern_file, mask_file",
    "synthesizers": "list of synthesizer names",
    "synth": "per-synthesizer overrides, {name: {key: value}}",
    "defenses": "list of defenses run at fixed hyperparameters",
    "defense_params": "per-defense fixed hyperparameters, {name: {key: value}}",
    "exclude": "combinations to skip, e.g. [{synthesizer: clean, defense: abd}]",
    "teacher": "arch, epochs, batch_size, lr, seed",
    "student": "arch",
    "seeds": "list of run seeds",
    "budget": "steps, eval_every, batch_size",
    "resources": "cpu, gpu per trial (gpu may be a fraction)",
    "max_concurrent": "trials running at once",
    "max_failures": "retries of a failing trial (from its last checkpoint)",
    "search": "Optuna search (mode: search only)",
    "smoke": "budgets used with --smoke",
    "cache_dir": "teacher cache root",
    "teacher_file": "distil every trial from this teacher (artifact folder, .safetensors or .pt state_dict) instead "
                    "of training one; loaded weights-only, checked against the teacher's arch before any compute",
    "faults": "fault injection for testing the study machinery: [{attack, synthesizer, defense, seed, "
              "raise_at_step | nan_at_step | pause_per_eval_s}]",
    "device": "auto | cpu | cuda",
}
_ATTACK_KEYS = ("target", "poison_ratio", "seed", "pattern_file", "mask_file")
_TEACHER_KEYS = ("arch", "epochs", "batch_size", "lr", "seed")
_STUDENT_KEYS = ("arch",)
_BUDGET_KEYS = ("steps", "eval_every", "batch_size")
_RESOURCE_KEYS = ("cpu", "gpu")
_SEARCH_KEYS = (
    "defense", "sampler", "num_samples", "seed", "include_defaults", "population_size", "startup_trials", "space"
)
_SMOKE_KEYS = tuple(SMOKE_DEFAULTS)
_EXCLUDE_KEYS = ("attack", "synthesizer", "defense")
_RANGE_KEYS = ("low", "high", "log", "step", "type")
_FAULT_MATCH = ("attack", "synthesizer", "defense", "seed")
_FAULT_KINDS = ("raise_at_step", "nan_at_step", "pause_per_eval_s")


def _hint(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class StudySpecError(ValueError):
    """A study file that does not validate; the message names the key and the allowed values."""


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a range (float or int, optionally log) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False
    choices: tuple[Any, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        d: dict[str, Any] = {"low": self.low, "high": self.high, "type": "int" if self.is_int else "float"}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass(frozen=True)
class SearchSpec:
    """The Optuna part of a study.

    Attributes:
        defense: the defense whose hyperparameters are searched.
        sampler: tpe | nsga2 | gp | random.
        num_samples: trials per attack x synthesizer cell (the defaults point included).
        seed: sampler seed.
        include_defaults: evaluate the defense's defaults first (as an enqueued Optuna trial).
        population_size: NSGA-II population (small: its default of 50 wastes a small budget).
        startup_trials: random trials before TPE or GP model the results; None: :func:`auto_startup_trials`
            (Optuna's default of 10 would make a study of 8 trials a random search).
        space: searched hyperparameters; fixed values are plain constants.
        fixed: hyperparameters held constant in every search trial.
    """

    defense: str = "abd"
    sampler: str = "tpe"
    num_samples: int = 8
    seed: int = 0
    include_defaults: bool = True
    population_size: int = 4
    startup_trials: int | None = None
    space: tuple[Param, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    """A validated study. Build it with :func:`load_spec` or :meth:`from_dict`."""

    name: str
    mode: str
    dataset: str
    attacks: tuple[str, ...]
    synthesizers: tuple[str, ...]
    defenses: tuple[str, ...]
    seeds: tuple[int, ...]
    description: str = ""
    data_root: str | None = None
    attack: dict[str, Any] = field(default_factory=dict)
    synth: dict[str, dict[str, Any]] = field(default_factory=dict)
    defense_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    exclude: tuple[dict[str, str], ...] = ()
    teacher: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=dict)
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int = 2
    max_failures: int = 2
    search: SearchSpec | None = None
    smoke: dict[str, int] = field(default_factory=lambda: dict(SMOKE_DEFAULTS))
    cache_dir: str | None = None
    device: str = "auto"
    teacher_file: str | None = None
    faults: tuple[dict[str, Any], ...] = ()
    source: str = ""  # the study file's text, kept for MLflow and the study folder

    # --- building ------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, where: str = "study file") -> StudySpec:
        """Validate a parsed study file.

        Args:
            raw: the YAML document.
            where: how errors name the file.

        Raises:
            StudySpecError: naming the bad key and the allowed values.
        """
        return _Validator(where).study(raw)

    def with_smoke(self) -> StudySpec:
        """A copy with the budgets of ``smoke`` (for ``--smoke``): short runs, one seed, few search trials."""
        s = self.smoke
        budget = dict(self.budget)
        budget["steps"] = min(budget.get("steps") or s["steps"], s["steps"])
        budget["eval_every"] = min(budget.get("eval_every") or s["eval_every"], s["eval_every"], budget["steps"])
        teacher = dict(self.teacher)
        teacher["epochs"] = min(teacher.get("epochs") or s["teacher_epochs"], s["teacher_epochs"])
        search = self.search
        if search is not None:
            search = dataclasses.replace(search, num_samples=min(search.num_samples, s["num_samples"]))
        return dataclasses.replace(self, budget=budget, teacher=teacher, search=search, seeds=self.seeds[:1])

    # --- what it plans -------------------------------------------------------------------------------------------

    def cells(self) -> list[tuple[str, str]]:
        """The (attack, synthesizer) cells of the study."""
        return [(a, s) for a in self.attacks for s in self.synthesizers]

    def _excluded(self, attack: str, synth: str, defense: str) -> bool:
        combo = {"attack": attack, "synthesizer": synth, "defense": defense}
        return any(all(combo[k] == v for k, v in rule.items()) for rule in self.exclude)

    def teacher_spec_dict(self, attack: str) -> dict[str, Any]:
        """The TeacherSpec (as a dict) of the teacher poisoned by ``attack``."""
        from abd_ray.attacks import AttackSpec
        from abd_ray.config import TeacherSpec, dataset_defaults

        a = {"name": attack, "target": dataset_defaults(self.dataset)["target"], **self.attack}
        t = self.teacher
        spec = TeacherSpec.for_dataset(self.dataset, AttackSpec(**a), arch=t.get("arch"), epochs=t.get("epochs"),
                                       batch_size=t.get("batch_size"), lr=t.get("lr"), seed=t.get("seed", 0))
        return spec.to_dict()

    def base_config(self, attack: str, synth: str, defense: str, seed: int, kind: str) -> dict[str, Any]:
        """The flat run config (RunConfig.to_flat keys) of one trial, without its teacher file.

        ``study.kind`` and ``study.cell`` are study metadata, logged with the params and stripped by the trainable.
        """
        from abd_ray.config import dataset_defaults

        flat: dict[str, Any] = {
            "dataset": self.dataset,
            "data_root": self.data_root,
            "attack.name": attack,
            "attack.target": self.attack.get("target", dataset_defaults(self.dataset)["target"]),
            "attack.poison_ratio": self.attack.get("poison_ratio", 0.1),
            "attack.seed": self.attack.get("seed", 0),
            "attack.pattern_file": self.attack.get("pattern_file"),
            "attack.mask_file": self.attack.get("mask_file"),
            "teacher_arch": self.teacher.get("arch") or dataset_defaults(self.dataset)["teacher_arch"],
            "student_arch": self.student.get("arch") or dataset_defaults(self.dataset)["student_arch"],
            "synthesizer": synth,
            "defense": defense,
            "steps": self.budget.get("steps"),
            "batch_size": self.budget.get("batch_size"),
            "eval_every": self.budget.get("eval_every"),
            "seed": seed,
            "teacher_seed": self.teacher.get("seed", 0),
            "device": self.device,
            "study.kind": kind,
            "study.cell": f"{attack}/{synth}",
        }
        for k, v in self.synth.get(synth, {}).items():
            flat[f"synth.{k}"] = v
        for rule in self.faults:
            combo = {"attack": attack, "synthesizer": synth, "defense": defense, "seed": seed}
            if all(combo[k] == rule[k] for k in _FAULT_MATCH if k in rule):
                flat.update({f"fault.{k}": rule[k] for k in _FAULT_KINDS if k in rule})
        if kind == "grid":
            for k, v in self.defense_params.get(defense, {}).items():
                flat[f"defense.{k}"] = v
        return flat

    def grid_configs(self) -> list[dict[str, Any]]:
        """Every fixed trial: cell x defense x seed, minus the excluded combinations."""
        out = []
        for attack, synth in self.cells():
            for defense in self.defenses:
                if self._excluded(attack, synth, defense):
                    continue
                for seed in self.seeds:
                    out.append(self.base_config(attack, synth, defense, seed, "grid"))
        return out

    def search_cells(self) -> list[tuple[str, str]]:
        """The cells an Optuna study searches (all cells, minus the excluded search defense)."""
        if self.search is None:
            return []
        return [(a, s) for a, s in self.cells() if not self._excluded(a, s, self.search.defense)]

    def planned_trials(self) -> int:
        """How many trials the study runs in all."""
        n = len(self.grid_configs())
        if self.search is not None:
            n += self.search.num_samples * len(self.search_cells())
        return n

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        if self.search is not None:
            d["search"]["space"] = {p.name: p.to_dict() for p in self.search.space}
        return d


META_PREFIXES = ("study.", "fault.")  # a trial's keys that are the study's, not the run config's


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial's flat dict into the run config keys and the study's own ``study.*`` / ``fault.*`` metadata."""
    run = {k: v for k, v in config.items() if not k.startswith(META_PREFIXES)}
    meta = {k: v for k, v in config.items() if k.startswith(META_PREFIXES)}
    return run, meta


def load_spec(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> StudySpec:
    """Read and validate a study file (YAML, safe loader only: a study file is data, never code).

    Args:
        path: the study file.
        base_dir: the folder relative paths in the file are relative to (default: the working directory); a
            resumed study passes the folder it was launched from.
    """
    p = Path(path)
    if not p.is_file():
        raise StudySpecError(f"study file {str(p)!r} does not exist; e.g. studies/quickstart.yaml")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise StudySpecError(f"study file {p} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}); save it as "
                             "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = f" line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise StudySpecError(f"study file {p}{mark}: not valid YAML for a study: tag "
                             f"{(e.problem or '').split(' tag ')[-1]} is not allowed (a study file is plain data: "
                             "mappings, lists, strings, numbers)") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise StudySpecError(f"study file {p}: not valid YAML ({first})") from None
    spec = _Validator(f"study file {p}", base_dir).study(raw)
    return dataclasses.replace(spec, source=text)


# --- validation ------------------------------------------------------------------------------------------------------


class _Validator:
    """Checks one study document; every error says where (``where: key``), what is wrong and what is allowed."""

    def __init__(self, where: str, base_dir: str | os.PathLike | None = None) -> None:
        self.where = where
        self.base = Path(base_dir) if base_dir is not None else None

    def path(self, value: str) -> Path:
        """A path of the file, relative ones taken from ``base_dir`` (the launch folder) when one is given."""
        p = Path(value).expanduser()
        return self.base / p if self.base is not None and not p.is_absolute() else p

    def fail(self, key: str, msg: str) -> StudySpecError:
        return StudySpecError(f"{self.where}: {key}: {msg}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | dict | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        if allowed is not None:
            allowed_l = sorted(allowed)
            for k in value:
                if k not in allowed:
                    raise self.fail(f"{key}.{k}" if key else str(k),
                                    f"unknown key{_hint(str(k), allowed_l)}; allowed: {', '.join(allowed_l)}")
        return dict(value)

    def names(self, value: Any, key: str, known: list[str], allow_empty: bool = False) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list of names; allowed: {', '.join(known)}")
        if not value and not allow_empty:
            raise self.fail(key, f"is empty; list at least one of: {', '.join(known)}")
        out = []
        for v in value:
            if v not in known:
                raise self.fail(key, f"unknown name {v!r}{_hint(str(v), known)}; allowed: {', '.join(known)}")
            if v in out:
                raise self.fail(key, f"{v!r} is listed twice")
            out.append(v)
        return tuple(out)

    def integer(self, value: Any, key: str, lo: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        return value

    def number(self, value: Any, key: str, lo: float | None = None, strict: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(key, f"must be a number, got {value!r}")
        if lo is not None and (value < lo or (strict and value == lo)):
            raise self.fail(key, f"must be {'>' if strict else '>='} {lo:g}, got {value}")
        return float(value)

    def study(self, raw: Any) -> StudySpec:
        from abd_ray.attacks import attack_names
        from abd_ray.models import classifier_names
        from abd_ray.registry import DATASETS, DEFENSES, SYNTHESIZERS, load_all

        load_all()
        if not isinstance(raw, dict):
            raise StudySpecError(f"{self.where}: must be a YAML mapping of keys ({', '.join(sorted(_TOP_KEYS))})")
        raw = copy.deepcopy(raw)
        self.mapping(raw, "", tuple(_TOP_KEYS))
        for required in ("name", "dataset", "attacks", "synthesizers"):
            if required not in raw:
                raise self.fail(required, f"is missing; it is required ({_TOP_KEYS[required]})")

        name = raw["name"]
        if not isinstance(name, str) or not STUDY_NAME_RE.match(name) or ".." in name:
            raise self.fail("name", f"{name!r} is not a valid study name; use letters, digits, '-', '_', '.' "
                                    "(no '/' or '..': it names a folder under the storage root)")
        mode = raw.get("mode", "grid")
        if mode not in MODES:
            raise self.fail("mode", f"unknown mode {mode!r}{_hint(str(mode), MODES)}; allowed: {', '.join(MODES)}")
        dataset = raw["dataset"]
        if dataset not in DATASETS:
            known = DATASETS.names()
            raise self.fail("dataset", f"unknown name {dataset!r}{_hint(str(dataset), known)}; allowed: "
                                       f"{', '.join(known)}")
        from abd_ray.data import dataset_info

        num_classes = dataset_info(dataset).num_classes
        attacks = self.names(raw["attacks"], "attacks", attack_names())
        synths = self.names(raw["synthesizers"], "synthesizers", SYNTHESIZERS.names())
        defenses = self.names(raw.get("defenses", ["none"]), "defenses", DEFENSES.names(),
                              allow_empty=(mode == "search"))

        attack = self.mapping(raw.get("attack"), "attack", _ATTACK_KEYS)
        if "target" in attack:
            t = self.integer(attack["target"], "attack.target", 0)
            if t >= num_classes:
                raise self.fail("attack.target", f"{t} is not a class of {dataset}; allowed: 0..{num_classes - 1}")
        if "poison_ratio" in attack:
            r = self.number(attack["poison_ratio"], "attack.poison_ratio", 0.0, strict=True)
            if r > 1:
                raise self.fail("attack.poison_ratio", f"{r} is outside (0, 1]; e.g. 0.1")
        if "seed" in attack:
            self.integer(attack["seed"], "attack.seed", 0)
        for k in ("pattern_file", "mask_file"):
            if attack.get(k) is not None and not self.path(str(attack[k])).is_file():
                raise self.fail(f"attack.{k}", f"{attack[k]!r} does not exist; give the path of a PNG or NPY file")

        synth = self.mapping(raw.get("synth"), "synth", None)
        for s, params in synth.items():
            if s not in synths:
                raise self.fail(f"synth.{s}", f"is not one of the study's synthesizers ({', '.join(synths)})")
            allowed = getattr(SYNTHESIZERS.get(s), "defaults", None)
            self.mapping(params, f"synth.{s}", tuple(allowed) if isinstance(allowed, dict) and allowed else None)

        defense_params = self.mapping(raw.get("defense_params"), "defense_params", None)
        for d, params in defense_params.items():
            if d not in DEFENSES:
                known = DEFENSES.names()
                raise self.fail(f"defense_params.{d}", f"unknown defense{_hint(str(d), known)}; allowed: "
                                                       f"{', '.join(known)}")
            self.mapping(params, f"defense_params.{d}", tuple(self._defense_defaults(d)))

        exclude_raw = raw.get("exclude") or []
        if not isinstance(exclude_raw, list):
            raise self.fail("exclude", "must be a list of {attack, synthesizer, defense} mappings")
        exclude = []
        for i, rule in enumerate(exclude_raw):
            rule = self.mapping(rule, f"exclude[{i}]", _EXCLUDE_KEYS)
            if not rule:
                raise self.fail(f"exclude[{i}]", "is empty; it would exclude everything")
            exclude.append({k: str(v) for k, v in rule.items()})

        teacher = self.mapping(raw.get("teacher"), "teacher", _TEACHER_KEYS)
        student = self.mapping(raw.get("student"), "student", _STUDENT_KEYS)
        for key, sec in (("teacher.arch", teacher), ("student.arch", student)):
            if sec.get("arch") is not None and sec["arch"] not in classifier_names():
                known = classifier_names()
                raise self.fail(key, f"unknown model {sec['arch']!r}{_hint(str(sec['arch']), known)}; allowed: "
                                     f"{', '.join(known)}")
        for k in ("epochs", "batch_size"):
            if k in teacher:
                self.integer(teacher[k], f"teacher.{k}", 1)
        if "lr" in teacher:
            self.number(teacher["lr"], "teacher.lr", 0.0, strict=True)
        if "seed" in teacher:
            self.integer(teacher["seed"], "teacher.seed", 0)

        seeds_raw = raw.get("seeds", [0])
        if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool):
            seeds_raw = [seeds_raw]
        if not isinstance(seeds_raw, list) or not seeds_raw:
            raise self.fail("seeds", "must be a non-empty list of integers, e.g. [0, 1, 2]")
        seeds = tuple(self.integer(s, "seeds", 0) for s in seeds_raw)
        if len(set(seeds)) != len(seeds):
            raise self.fail("seeds", f"{list(seeds)} repeats a seed")

        budget = self.mapping(raw.get("budget"), "budget", _BUDGET_KEYS)
        for k in _BUDGET_KEYS:
            if k in budget:
                self.integer(budget[k], f"budget.{k}", 1)
        if "steps" in budget and "eval_every" in budget and budget["eval_every"] > budget["steps"]:
            raise self.fail("budget.eval_every", f"{budget['eval_every']} > budget.steps {budget['steps']}: "
                                                 "the run would never be evaluated")

        res = self.mapping(raw.get("resources"), "resources", _RESOURCE_KEYS)
        cpu = self.number(res.get("cpu", 1), "resources.cpu", 0.0, strict=True)
        gpu = self.number(res.get("gpu", 0), "resources.gpu", 0.0)
        if gpu > 1 and gpu != int(gpu):
            raise self.fail("resources.gpu", f"{gpu}: a fraction must be <= 1 (several GPUs: a whole number)")
        max_concurrent = self.integer(raw.get("max_concurrent", 2), "max_concurrent", 1)
        max_failures = self.integer(raw.get("max_failures", 2), "max_failures", 0)

        smoke = dict(SMOKE_DEFAULTS)
        for k, v in self.mapping(raw.get("smoke"), "smoke", _SMOKE_KEYS).items():
            smoke[k] = self.integer(v, f"smoke.{k}", 1)

        device = raw.get("device", "auto")
        if device not in ("auto", "cpu", "cuda"):
            raise self.fail("device", f"unknown device {device!r}; allowed: auto, cpu, cuda")
        cache_dir = raw.get("cache_dir")
        if cache_dir is not None and not isinstance(cache_dir, str):
            raise self.fail("cache_dir", "must be a path")
        data_root = raw.get("data_root")
        if data_root is not None and not isinstance(data_root, str):
            raise self.fail("data_root", "must be a path")
        if data_root is not None and not self.path(data_root).is_dir():
            raise self.fail("data_root", f"{data_root!r} is not a folder; give the folder that holds the "
                                         "torchvision datasets (e.g. ./data with cifar-10-batches-py in it)")
        teacher_file = raw.get("teacher_file")
        if teacher_file is not None:
            if not isinstance(teacher_file, str) or not self.path(teacher_file).exists():
                raise self.fail("teacher_file", f"{teacher_file!r} does not exist; give a teacher artifact folder, "
                                                ".safetensors or .pt state_dict")
            if len(attacks) != 1:
                raise self.fail("attacks", f"{list(attacks)}: with teacher_file the study distils one given teacher, "
                                           "so list exactly the one attack it carries")
        faults = []
        faults_raw = raw.get("faults") or []
        if not isinstance(faults_raw, list):
            raise self.fail("faults", "must be a list of {attack, synthesizer, defense, seed, raise_at_step | "
                                      "nan_at_step | pause_per_eval_s} mappings")
        for i, rule in enumerate(faults_raw):
            rule = self.mapping(rule, f"faults[{i}]", _FAULT_MATCH + _FAULT_KINDS)
            if not any(k in rule for k in _FAULT_KINDS):
                raise self.fail(f"faults[{i}]", f"names no fault; give one of: {', '.join(_FAULT_KINDS)}")
            for k in _FAULT_KINDS:
                if k in rule:
                    self.integer(rule[k], f"faults[{i}].{k}", 1)
            if "seed" in rule:
                self.integer(rule["seed"], f"faults[{i}].seed", 0)
            faults.append(rule)

        search = None
        if mode == "search":
            if "search" not in raw:
                raise self.fail("search", "is missing; mode: search needs a search section (defense, sampler, "
                                          "num_samples, space)")
            search = self.search(raw["search"])
        elif "search" in raw:
            raise self.fail("search", "is only allowed with mode: search (mode is grid)")

        spec = StudySpec(
            name=name, mode=mode, dataset=dataset, attacks=attacks, synthesizers=synths, defenses=defenses,
            seeds=seeds, description=str(raw.get("description", "")), data_root=data_root, attack=attack,
            synth={k: dict(v or {}) for k, v in synth.items()},
            defense_params={k: dict(v or {}) for k, v in defense_params.items()}, exclude=tuple(exclude),
            teacher=teacher, student=student, budget=budget, cpu=cpu, gpu=gpu, max_concurrent=max_concurrent,
            max_failures=max_failures, search=search, smoke=smoke, cache_dir=cache_dir, device=device,
            teacher_file=str(self.path(teacher_file).resolve()) if teacher_file else None,
            faults=tuple(faults),
        )
        if spec.planned_trials() == 0:
            raise self.fail("exclude", "excludes every trial of the study")
        return spec

    def _defense_defaults(self, name: str) -> dict[str, Any]:
        from abd_ray.registry import DEFENSES

        defaults = getattr(DEFENSES.get(name), "defaults", None)
        return dict(defaults) if isinstance(defaults, dict) else {}

    def search(self, raw: Any) -> SearchSpec:
        from abd_ray.registry import DEFENSES

        sec = self.mapping(raw, "search", _SEARCH_KEYS)
        defense = sec.get("defense", "abd")
        if defense not in DEFENSES or defense == "none":
            known = [d for d in DEFENSES.names() if d != "none"]
            raise self.fail("search.defense", f"{defense!r} cannot be searched{_hint(str(defense), known)}; "
                                              f"allowed: {', '.join(known) or '(no defense registered yet)'}")
        sampler = sec.get("sampler", "tpe")
        if sampler not in SAMPLERS:
            raise self.fail("search.sampler", f"unknown sampler {sampler!r}{_hint(str(sampler), SAMPLERS)}; "
                                              f"allowed: {', '.join(SAMPLERS)}")
        num_samples = self.integer(sec.get("num_samples", 8), "search.num_samples", 1)
        seed = self.integer(sec.get("seed", 0), "search.seed", 0)
        include = sec.get("include_defaults", True)
        if not isinstance(include, bool):
            raise self.fail("search.include_defaults", f"must be true or false, got {include!r}")
        pop = self.integer(sec.get("population_size", 4), "search.population_size", 2)
        startup = sec.get("startup_trials")
        if startup is not None:
            startup = self.integer(startup, "search.startup_trials", 1)
        defaults = self._defense_defaults(defense)
        allowed = sorted(defaults)
        space_raw = self.mapping(sec.get("space"), "search.space", tuple(allowed))
        params, fixed = [], {}
        for k, v in space_raw.items():
            key = f"search.space.{k}"
            if isinstance(v, dict):
                params.append(self.param(k, v, key))
            elif isinstance(v, list):
                raise self.fail(key, f"a bare list is ambiguous; write {{choices: {v}}}")
            else:
                fixed[k] = v
        if not params:
            raise self.fail("search.space", f"searches nothing; give at least one range {{low, high}} or "
                                            f"{{choices: [...]}} over: {', '.join(allowed)}")
        if include:
            for p in params:
                if p.name not in defaults:
                    continue
                d = defaults[p.name]
                if p.choices is not None and d not in p.choices:
                    raise self.fail(f"search.space.{p.name}.choices", f"{list(p.choices)} lacks the default {d!r}; "
                                    "add it, or set search.include_defaults: false")
                numeric = isinstance(d, (int, float)) and not isinstance(d, bool)
                if p.choices is None and numeric and not p.low <= d <= p.high:
                    raise self.fail(f"search.space.{p.name}", f"range {p.low:g}..{p.high:g} excludes the default "
                                    f"{d!r}; widen it, or set search.include_defaults: false")
        return SearchSpec(defense=defense, sampler=sampler, num_samples=num_samples, seed=seed,
                          include_defaults=include, population_size=pop, startup_trials=startup,
                          space=tuple(params), fixed=fixed)

    def param(self, name: str, raw: dict, key: str) -> Param:
        if "choices" in raw:
            extra = sorted(set(raw) - {"choices"})
            if extra:
                raise self.fail(f"{key}.{extra[0]}", "is not allowed beside choices; allowed: choices")
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices:
                raise self.fail(f"{key}.choices", "must be a non-empty list")
            if not all(isinstance(c, (bool, int, float, str)) or c is None for c in choices):
                raise self.fail(f"{key}.choices", "must hold plain values (numbers, strings, true/false, null)")
            return Param(name, choices=tuple(choices))
        self.mapping(raw, key, _RANGE_KEYS + ("choices",))
        for k in ("low", "high"):
            if k not in raw:
                raise self.fail(key, f"needs {k!r} (a range is {{low, high[, log, step, type]}}) or choices")
        low = self.number(raw["low"], f"{key}.low")
        high = self.number(raw["high"], f"{key}.high")
        if low > high:
            raise self.fail(key, f"inverted range: low {raw['low']} > high {raw['high']}; give low <= high")
        kind = raw.get("type")
        if kind is None:
            kind = "int" if all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ("low", "high")) \
                else "float"
        if kind not in ("int", "float"):
            raise self.fail(f"{key}.type", f"unknown type {kind!r}; allowed: int, float")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise self.fail(f"{key}.log", f"must be true or false, got {log!r}")
        if log and low <= 0:
            raise self.fail(f"{key}.log", f"a log range needs low > 0, got {raw['low']}")
        step = raw.get("step")
        if step is not None:
            step = self.number(step, f"{key}.step", 0.0, strict=True)
            if log:
                raise self.fail(f"{key}.step", "cannot be combined with log: true")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise self.fail(key, f"type int needs integer bounds, got {raw['low']}..{raw['high']}")
        return Param(name, low=low, high=high, log=log, step=step, is_int=(kind == "int"))
