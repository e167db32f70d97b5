"""Validation of a study file: every error names the bad key, what is wrong and what is allowed, in one line.

The attack's and the teacher's own values are checked by building them (:class:`~abd_ray.attacks.AttackSpec`,
:class:`~abd_ray.config.TeacherSpec`); this module checks the study's own keys and their shapes.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from abd_ray.study.spec import (
    FAULT_KINDS,
    FAULT_MATCH,
    SMOKE_DEFAULTS,
    STUDY_NAME_RE,
    SWITCH_NAMES,
    SWITCHES,
    Param,
    SearchSpec,
    StudySpec,
    StudySpecError,
)

MODES = ("grid", "search")
SAMPLERS = ("tpe", "nsga2", "gp", "random")

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
    "profile": "named synthesizer and defense values under the study's own: default | paper",
}
_ATTACK_KEYS = ("target", "poison_ratio", "seed", "pattern_file", "mask_file")
_TEACHER_KEYS = ("arch", "epochs", "batch_size", "lr", "seed")
_STUDENT_KEYS = ("arch",)
_BUDGET_KEYS = ("steps", "eval_every", "batch_size")
_RESOURCE_KEYS = ("cpu", "gpu")
_SEARCH_KEYS = (
    "defense", "sampler", "num_samples", "seed", "include_defaults", "population_size", "startup_trials", "space",
    "enqueue",
)
_SMOKE_KEYS = tuple(SMOKE_DEFAULTS)
_EXCLUDE_KEYS = ("attack", "synthesizer", "defense")
_RANGE_KEYS = ("low", "high", "log", "step", "type")


def _on_off(v: Any) -> bool | None:
    """A switch value: YAML's on / off (true / false), or the strings "on" / "off"; None for anything else."""
    if isinstance(v, bool):
        return v
    return {"on": True, "off": False}.get(v) if isinstance(v, str) else None


def _show(p: Param) -> str:
    """A parameter's choices as a study file writes them (a switch's as on / off)."""
    if p.name in SWITCH_NAMES:
        return ", ".join("on" if c else "off" for c in p.choices)
    return ", ".join(repr(c) for c in p.choices)


def _hint(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""




class Validator:
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
        attacks = self.names(raw["attacks"], "attacks", attack_names())
        synths = self.names(raw["synthesizers"], "synthesizers", SYNTHESIZERS.names())
        defenses = self.names(raw.get("defenses", ["none"]), "defenses", DEFENSES.names(),
                              allow_empty=(mode == "search"))

        # The attack's and the teacher's own values are validated by their specs (see _check_teachers).
        attack = self.mapping(raw.get("attack"), "attack", _ATTACK_KEYS)
        if "seed" in attack:
            self.integer(attack["seed"], "attack.seed", 0)

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

        exclude = self.exclude(raw.get("exclude"))

        teacher = self.mapping(raw.get("teacher"), "teacher", _TEACHER_KEYS)
        student = self.mapping(raw.get("student"), "student", _STUDENT_KEYS)
        for key, sec in (("teacher.arch", teacher), ("student.arch", student)):
            if sec.get("arch") is not None and sec["arch"] not in classifier_names():
                known = classifier_names()
                raise self.fail(key, f"unknown model {sec['arch']!r}{_hint(str(sec['arch']), known)}; allowed: "
                                     f"{', '.join(known)}")
        if "lr" in teacher:
            self.number(teacher["lr"], "teacher.lr")  # its range is TeacherSpec's; a string would not compare
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
        faults = self.faults(raw.get("faults"))
        profile = self.profile(raw.get("profile", "default"), dataset, synth, defense_params,
                               synths, [*defenses, *self._searched(raw.get("search"))])

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
            faults=tuple(faults), profile=profile,
        )
        self._check_teachers(spec)
        if spec.planned_trials() == 0:
            raise self.fail("exclude", "excludes every trial of the study")
        return spec

    def exclude(self, raw: Any) -> list[dict[str, str]]:
        """The ``exclude:`` rules: combinations of attack, synthesizer and defense that do not run."""
        exclude_raw = raw or []
        if not isinstance(exclude_raw, list):
            raise self.fail("exclude", "must be a list of {attack, synthesizer, defense} mappings")
        exclude = []
        for i, rule in enumerate(exclude_raw):
            rule = self.mapping(rule, f"exclude[{i}]", _EXCLUDE_KEYS)
            if not rule:
                raise self.fail(f"exclude[{i}]", "is empty; it would exclude everything")
            exclude.append({k: str(v) for k, v in rule.items()})
        return exclude

    def faults(self, raw: Any) -> list[dict[str, Any]]:
        """The ``faults:`` rules: which trials (attack, synthesizer, defense, seed) fail how."""
        faults = []
        faults_raw = raw or []
        if not isinstance(faults_raw, list):
            raise self.fail("faults", "must be a list of {attack, synthesizer, defense, seed, raise_at_step | "
                                      "nan_at_step | pause_per_eval_s} mappings")
        for i, rule in enumerate(faults_raw):
            rule = self.mapping(rule, f"faults[{i}]", FAULT_MATCH + FAULT_KINDS)
            if not any(k in rule for k in FAULT_KINDS):
                raise self.fail(f"faults[{i}]", f"names no fault; give one of: {', '.join(FAULT_KINDS)}")
            for k in FAULT_KINDS:
                if k in rule:
                    self.integer(rule[k], f"faults[{i}].{k}", 1)
            if "seed" in rule:
                self.integer(rule["seed"], f"faults[{i}].seed", 0)
            faults.append(rule)
        return faults

    @staticmethod
    def _searched(search: Any) -> list[str]:
        ok = isinstance(search, dict) and isinstance(search.get("defense"), str)
        return [search["defense"]] if ok else []

    def profile(self, name: Any, dataset: str, synth: dict, defense_params: dict, synths: tuple[str, ...],
                defenses: list[str]) -> str:
        """The ``profile:`` name; its values under the study's own, for every synthesizer x defense of the study,
        must validate."""
        from abd_ray.defenses import build_defense
        from abd_ray.profiles import check_profile, profile_values
        from abd_ray.registry import SYNTHESIZERS

        try:
            check_profile(name)
        except ValueError as e:
            raise self.fail("profile", str(e)) from None
        if name == "default":
            return name
        for s in synths:
            for d in dict.fromkeys(defenses):
                try:
                    p_synth, p_defense = profile_values(name, s, dataset, d)
                    SYNTHESIZERS.get(s).resolve_params({**p_synth, **(synth.get(s) or {})}, dataset)
                    build_defense(d, {**p_defense, **(defense_params.get(d) or {})})
                except ValueError as e:
                    raise self.fail("profile", f"{name} for {s} / {d}: {e}") from None
        return name

    def _check_teachers(self, spec: StudySpec) -> None:
        """Build the teacher of each attack as the study will, and let its spec validate it (pattern and mask files
        taken relative to the launch folder)."""
        for attack in spec.attacks:
            t = spec.teacher_spec(attack)
            files = {k: str(self.path(str(v))) for k in ("pattern_file", "mask_file")
                     if (v := getattr(t.attack, k)) is not None}
            try:
                replace(t, attack=replace(t.attack, **files)).validate()
            except ValueError as e:
                raise StudySpecError(f"{self.where}: {e}") from None

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
        switches = SWITCHES.get(defense, {})
        allowed = sorted(defaults)
        space_raw = self.mapping(sec.get("space"), "search.space", (*allowed, *switches))
        params, fixed = [], {}
        for k, v in space_raw.items():
            key = f"search.space.{k}"
            if k in switches:
                params.append(self.switch(k, v, key))
            elif isinstance(v, dict):
                params.append(self.param(k, {x: y for x, y in v.items() if x != "when"}, key))
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
        params = self.conditions(params, space_raw, defense)
        enqueue = self.enqueue(sec["enqueue"], params) if "enqueue" in sec else None
        return SearchSpec(defense=defense, sampler=sampler, num_samples=num_samples, seed=seed,
                          include_defaults=include, population_size=pop, startup_trials=startup,
                          space=tuple(params), fixed=fixed, enqueue=enqueue)

    # --- conditional search spaces and the warm start ----------------------------------------------------------------

    def switch(self, name: str, raw: Any, key: str) -> Param:
        """A switch of the searched defense (:data:`~abd_ray.study.spec.SWITCHES`): ``{choices: [on, off]}``,
        kept as true / false."""
        choices = raw.get("choices") if isinstance(raw, dict) and set(raw) == {"choices"} else None
        if not isinstance(choices, list) or not choices or any(_on_off(c) is None for c in choices):
            raise self.fail(key, f"is a switch: write {{choices: [on, off]}} (or just [on] / [off]), got {raw!r}")
        values = tuple(dict.fromkeys(_on_off(c) for c in choices))
        return Param(name, choices=values)

    def conditions(self, params: list[Param], space_raw: dict[str, Any], defense: str) -> list[Param]:
        """The ``when: {name: value | [values]}`` of each searched parameter: it names an unconditional choice
        parameter of the space and values among its choices; the parameters a switch's ``off`` defense does not
        take must be conditional on that switch being on."""
        by_name = {p.name: p for p in params}
        out = []
        for p in params:
            raw = space_raw[p.name]
            when_raw = raw.get("when") if isinstance(raw, dict) else None
            key = f"search.space.{p.name}.when"
            if when_raw is None:
                out.append(p)
                continue
            if not isinstance(when_raw, dict) or not when_raw:
                raise self.fail(key, f"must be a mapping {{parameter: value}}, e.g. when: {{sr: on}}; got {when_raw!r}")
            when = []
            for ref, want in when_raw.items():
                parent = by_name.get(ref)
                choice_names = sorted(n for n, q in by_name.items() if q.choices is not None and n != p.name)
                if parent is None or parent.choices is None or parent is p:
                    raise self.fail(f"{key}.{ref}", "must name a {choices: [...]} parameter of search.space"
                                    f"{_hint(str(ref), choice_names)}; allowed: {', '.join(choice_names) or '(none)'}")
                if isinstance(space_raw[ref], dict) and "when" in space_raw[ref]:
                    raise self.fail(f"{key}.{ref}", f"{ref!r} is itself conditional; a condition must name an "
                                    "unconditional parameter")
                wants = want if isinstance(want, list) else [want]
                if ref in SWITCHES.get(defense, {}):
                    wants = [_on_off(w) for w in wants]
                bad = [w for w in wants if w not in parent.choices]
                if bad or not wants:
                    raise self.fail(f"{key}.{ref}", f"{want!r} is not among {ref}'s choices; allowed: "
                                    f"{_show(parent)}")
                when.append((parent.key, tuple(wants)))
            out.append(replace(p, when=tuple(when)))
        for name, (_, off) in SWITCHES.get(defense, {}).items():
            sw = by_name.get(name)
            if sw is None or False not in sw.choices:
                continue
            takes = self._defense_defaults(off)
            for p in out:
                if p.name != name and p.name not in takes and not any(k == sw.key and v == (True,) for k, v in p.when):
                    raise self.fail(f"search.space.{p.name}", f"means nothing with {name} off (defense {off} has no "
                                    f"{p.name}); add when: {{{name}: on}}")
        return out

    def enqueue(self, raw: Any, params: list[Param]) -> tuple[dict[str, Any], ...]:
        """The ``search.enqueue`` points: mappings over the searched parameters, each value inside its range or
        among its choices, no parameter that the point's own values make moot."""
        if not isinstance(raw, list):
            raise self.fail("search.enqueue", "must be a list of points, e.g. [{coef: 1.0}, {coef: 4.0}]")
        by_name = {p.name: p for p in params}
        out = []
        for i, pt in enumerate(raw):
            key = f"search.enqueue[{i}]"
            pt = self.mapping(pt, key, tuple(by_name))
            if not pt:
                raise self.fail(key, f"is empty; give values of: {', '.join(by_name)}")
            for name, v in pt.items():
                p = by_name[name]
                if p.choices is not None:
                    given = _on_off(v) if p.name in SWITCH_NAMES else v
                    if given is None or given not in p.choices:
                        raise self.fail(f"{key}.{name}", f"{v!r} is not among its choices; allowed: {_show(p)}")
                    pt[name] = given
                else:
                    v = self.number(v, f"{key}.{name}")
                    pt[name] = int(v) if p.is_int and v == int(v) else v
                    if not p.low <= v <= p.high or (p.is_int and v != int(v)):
                        raise self.fail(f"{key}.{name}", f"{pt[name]!r} is outside its range {p.low:g}..{p.high:g}"
                                        f"{' (integers)' if p.is_int else ''}; give a value inside it")
            by_key = {by_name[n].key: v for n, v in pt.items()}
            for name in pt:
                p = by_name[name]
                given = [k for k, _ in p.when if k in by_key]
                if given and not p.active(by_key):
                    names = ", ".join(k.split(".", 1)[1] for k in given)
                    raise self.fail(f"{key}.{name}", f"is moot at this point (its when excludes it at this {names}); "
                                    "remove it")
            out.append(pt)
        return tuple(out)

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
