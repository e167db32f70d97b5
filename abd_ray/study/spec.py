"""Study files: YAML in, a validated :class:`StudySpec` out, and the trials it plans.

A study file names one dataset and the axes of a study (attacks, synthesizers, defenses, seeds), the teacher and
student, the budget and the resources of a trial. In ``grid`` mode every combination runs; in ``search`` mode the
listed defenses still run as fixed baselines, and Optuna searches the hyperparameters of one defense
(ALGORITHMS.md section 4.3) in one Optuna study per attack x synthesizer cell.

Every check runs before Ray starts (:mod:`abd_ray.study.validate`), and every error names the bad key and what is
allowed. This module imports neither ray nor optuna, so validation stays fast and usable from the CLI and tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from abd_ray.attacks import AttackSpec
    from abd_ray.config import RunConfig, TeacherSpec

# Defaults for --smoke: enough steps for two evaluations, a teacher of a few epochs, one seed.
SMOKE_DEFAULTS = {"steps": 40, "eval_every": 20, "teacher_epochs": 3, "num_samples": 2}
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

FAULT_MATCH = ("attack", "synthesizer", "defense", "seed")
FAULT_KINDS = ("raise_at_step", "nan_at_step", "pause_per_eval_s")


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
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # suggested only if each named parameter takes one of these

    @property
    def key(self) -> str:
        """The name of the parameter in a trial's flat config (and in Optuna): ``defense.<name>``, or
        ``study.<name>`` for a switch (:data:`SWITCHES`), which the plan reads and the run config never sees."""
        return f"study.{self.name}" if self.name in SWITCH_NAMES else f"defense.{self.name}"

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the parameter means anything given the values (by :attr:`key`) of those its ``when`` names."""
        return all(values.get(key) in allowed for key, allowed in self.when)

    def to_dict(self) -> dict[str, Any]:
        d = self._range_dict()
        if self.when:
            d["when"] = {k.split(".", 1)[1]: list(v) if len(v) > 1 else v[0] for k, v in self.when}
        return d

    def _range_dict(self) -> dict[str, Any]:
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
        enqueue: points (``{name: value}`` over ``space``) evaluated first, in order, before the sampler proposes;
            ``None``: the default warm start (:meth:`warm_start`).
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
    enqueue: tuple[dict[str, Any], ...] | None = None

    def switch_defense(self, values: dict[str, Any]) -> str:
        """The defense a search trial runs, given its values by key: the searched one unless a switch
        (:data:`SWITCHES`) turns a part of it off."""
        for name, (_on, off) in SWITCHES.get(self.defense, {}).items():
            if values.get(f"study.{name}") is False:
                return off
        return self.defense

    def trial_config(self, constants: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """The constants of a search trial given its searched values (by key): with a switch off, the defense it
        switches to, without the fixed values that defense does not take (they are moot)."""
        defense = self.switch_defense(values)
        if defense == constants.get("defense"):
            return dict(constants)
        takes = defense_defaults(defense)
        out = {k: v for k, v in constants.items() if not k.startswith("defense.") or k.split(".", 1)[1] in takes}
        return {**out, "defense": defense}

    def defenses(self) -> tuple[str, ...]:
        """Every defense a search trial can run (the searched one, and what its switches turn it into)."""
        offs = [SWITCHES[self.defense][p.name][1] for p in self.space if p.name in SWITCHES.get(self.defense, {})]
        return (self.defense, *offs)

    def warm_start(self, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """The points enqueued before the sampler, by key, each completed by the defaults and without its moot
        parameters; duplicates dropped.

        With ``include_defaults`` the defaults come first. Then the study's ``enqueue`` points; without any, the
        default warm start: the defaults with ``coef`` at the low and at the high end of its range, the two ends of
        a vaccine-strength sweep (the grid of ``bench/run.py search`` spans coef 0.1 / 1 / 10), so that the
        sampler's model starts from the whole scale rather than from the defaults alone.

        Args:
            defaults: the searched parameters' default values by key (where a default lies in the space).
        """
        points: list[dict[str, Any]] = [{}] if self.include_defaults else []
        if self.enqueue is not None:
            points += [{_param(self, k).key: v for k, v in pt.items()} for pt in self.enqueue]
        elif self.include_defaults:
            coef = next((p for p in self.space if p.name == "coef" and p.choices is None and not p.when), None)
            if coef is not None:
                points += [{coef.key: coef.low}, {coef.key: coef.high}]
        out: list[dict[str, Any]] = []
        for pt in points:
            full = {**defaults, **pt}
            full = {p.key: full[p.key] for p in self.space if p.key in full and p.active(full)}
            if full and full not in out:
                out.append(full)
        return out


# Switches of a searched defense: a ``search.space`` entry ``<name>: {choices: [on, off]}`` whose ``off`` runs the
# other defense (with the parameters it owns; the rest are moot and carry ``when: {<name>: on}``).
SWITCHES: dict[str, dict[str, tuple[str, str]]] = {"abd": {"sr": ("abd", "sv")}}
SWITCH_NAMES = frozenset(n for sw in SWITCHES.values() for n in sw)


def defense_defaults(name: str) -> dict[str, Any]:
    """The registered defaults of a defense (its hyperparameters)."""
    from abd_ray.registry import DEFENSES, load_all

    load_all()
    return dict(getattr(DEFENSES.get(name), "defaults", {}) or {})


def _param(search: SearchSpec, name: str) -> Param:
    return next(p for p in search.space if p.name == name)


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
    profile: str = "default"  # abd_ray.profiles: values every trial takes under the study's explicit ones
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
        from abd_ray.study.validate import Validator

        return Validator(where).study(raw)

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

    def attack_spec(self, attack: str) -> AttackSpec:
        """The poisoning of the teacher of ``attack``: the study's common attack settings over AttackSpec's
        defaults, the dataset's target class unless one is given."""
        from abd_ray.attacks import AttackSpec
        from abd_ray.config import dataset_defaults

        return AttackSpec(**{"name": attack, "target": dataset_defaults(self.dataset)["target"], **self.attack})

    def teacher_spec(self, attack: str) -> TeacherSpec:
        """The teacher poisoned by ``attack``."""
        from abd_ray.config import TeacherSpec

        t = self.teacher
        return TeacherSpec.for_dataset(self.dataset, self.attack_spec(attack), arch=t.get("arch"),
                                       epochs=t.get("epochs"), batch_size=t.get("batch_size"), lr=t.get("lr"),
                                       seed=t.get("seed", 0))

    def run_config(self, attack: str, synth: str, defense: str, seed: int, kind: str) -> RunConfig:
        """The run config of one trial, without its teacher file (the teacher stage provides it); a search trial
        gets its defense hyperparameters from the search, a fixed one from ``defense_params``."""
        from abd_ray.config import RunConfig, dataset_defaults

        d = dataset_defaults(self.dataset)
        return RunConfig(
            dataset=self.dataset, data_root=self.data_root, attack=self.attack_spec(attack),
            teacher_arch=self.teacher.get("arch") or d["teacher_arch"],
            student_arch=self.student.get("arch") or d["student_arch"],
            synthesizer=synth, synth=dict(self.synth.get(synth, {})), defense=defense,
            defense_params=dict(self.defense_params.get(defense, {})) if kind == "grid" else {},
            steps=self.budget.get("steps"), batch_size=self.budget.get("batch_size"),
            eval_every=self.budget.get("eval_every"), seed=seed, teacher_seed=self.teacher.get("seed", 0),
            device=self.device, profile=self.profile,
        )

    def base_config(self, attack: str, synth: str, defense: str, seed: int, kind: str) -> dict[str, Any]:
        """The flat config of one trial: its run config flattened (without the keys the plan sets, and without a
        student file: a study's students start from scratch), the study's ``study.kind`` / ``study.cell`` and the
        ``fault.*`` keys of the faults that match it. The study keys are logged with the params and stripped by
        the trainable."""
        # The profile's values are written out, so a trial's params show what it ran with.
        flat = self.run_config(attack, synth, defense, seed, kind).with_profile().to_flat()
        for k in PLANNED_KEYS + ("student_file",):
            del flat[k]
        flat.update({"study.kind": kind, "study.cell": cell_key(attack, synth)})
        for rule in self.faults:
            combo = {"attack": attack, "synthesizer": synth, "defense": defense, "seed": seed}
            if all(combo[k] == rule[k] for k in FAULT_MATCH if k in rule):
                flat.update({f"fault.{k}": rule[k] for k in FAULT_KINDS if k in rule})
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

    def search_constants(self) -> dict[str, dict[str, Any]]:
        """Per search cell (its :func:`cell_key`), the flat config its search trials share: the base config of the
        first seed with the search's fixed defense values."""
        out = {}
        for attack, synth in self.search_cells():
            base = self.base_config(attack, synth, self.search.defense, self.seeds[0], "search")
            base.update({f"defense.{k}": v for k, v in self.search.fixed.items()})
            out[cell_key(attack, synth)] = base
        return out

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
            if self.search.enqueue is not None:
                d["search"]["enqueue"] = [dict(pt) for pt in self.search.enqueue]
        return d


# The keys of a trial's flat config that the plan fills in once the teacher stage has run.
PLANNED_KEYS = ("teacher_file", "cache_dir")


def cell_key(attack: str, synth: str) -> str:
    """The name of an attack x synthesizer cell: ``attack/synthesizer``."""
    return f"{attack}/{synth}"


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
    from abd_ray.study.validate import Validator

    spec = Validator(f"study file {p}", base_dir).study(raw)
    return dataclasses.replace(spec, source=text)
