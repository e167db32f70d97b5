"""Run configuration: small frozen dataclasses, plain dicts in and out, validation in one place.

A run is (dataset, attack, teacher, student, synthesizer, defense, budget, seed). Ray passes a trainable one flat
dict (``attack.name``, ``synth.beta``, ``defense.coef``, ...), MLflow logs the same dict as params, and
``abd-ray distill --set key=value`` writes into it; :meth:`RunConfig.from_flat` turns it into a config once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from abd_ray.attacks.poison import AttackSpec
from abd_ray.data import dataset_info
from abd_ray.models import classifier_names


def dataset_defaults(dataset: str) -> dict[str, Any]:
    """The run defaults of a registered dataset, as a dict (an unknown name raises, listing the known ones)."""
    return asdict(dataset_info(dataset).defaults)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines a teacher; its hash is the teacher cache key. :meth:`for_dataset` fills in the
    dataset's defaults.

    Attributes:
        dataset: dataset name.
        arch: classifier name.
        attack: the poisoning.
        epochs: training epochs.
        batch_size: SGD batch size.
        lr: initial SGD learning rate (cosine decay to 0, momentum 0.9, weight decay 5e-4).
        seed: weight-init and data-order seed.
    """

    dataset: str
    arch: str
    attack: AttackSpec
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0

    @classmethod
    def for_dataset(cls, dataset: str, attack: AttackSpec | None = None, **overrides: Any) -> TeacherSpec:
        """The dataset's default teacher; ``overrides`` that are not None replace its fields."""
        d = dataset_info(dataset).defaults
        kw: dict[str, Any] = dict(
            dataset=dataset,
            arch=d.teacher_arch,
            attack=attack or AttackSpec(target=d.target),
            epochs=d.teacher_epochs,
            batch_size=d.teacher_batch,
            lr=d.teacher_lr,
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def validate(self) -> None:
        """Raise a ValueError naming the bad field (unknown dataset or model, bad attack, bad budget)."""
        info = dataset_info(self.dataset)
        if self.arch not in classifier_names():
            raise ValueError(f"unknown model {self.arch!r}; known classifiers: {', '.join(classifier_names())}")
        self.attack.validate(info.num_classes)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"teacher {name}={v!r} must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"teacher lr={self.lr!r} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        d = dict(d)
        d["attack"] = AttackSpec(**d.get("attack", {}))
        return cls(**d)


@dataclass(frozen=True)
class RunConfig:
    """One distillation run.

    Attributes:
        dataset: dataset name.
        data_root: folder of the torchvision datasets (not part of any hash).
        attack: the teacher's poisoning.
        teacher_arch: teacher classifier (dataset default if None).
        student_arch: student classifier (dataset default if None).
        teacher_file: an external teacher file to distil from instead of training one.
        student_file: start the student from these weights (a trial's ``student.safetensors``, or a ``.pt``
            state_dict) instead of from scratch; with ``defense.sr_start=0`` this runs Self-Retrospection as a
            second stage on a saved student, as the paper did.
        synthesizer: synthesizer name.
        synth: synthesizer keyword overrides.
        defense: defense name (none, sv, sr, abd).
        defense_params: defense keyword overrides.
        steps: distillation steps (generator steps for generative synthesizers).
        batch_size: synthetic batch size.
        eval_every: evaluate every this many steps.
        seed: run seed (student init, synthesis, data order).
        teacher_seed: the teacher's training seed; one teacher serves every run seed, as in the paper.
        cache_dir: root of the teacher cache.
        device: ``auto`` (CUDA if present), ``cpu`` or ``cuda``.
        profile: a named set of synthesizer and defense values (:mod:`abd_ray.profiles`): ``default`` (none) or
            ``paper`` (the published code's); applied by :meth:`resolved` under ``synth`` and ``defense_params``.
    """

    dataset: str = "digits"
    data_root: str | None = None
    attack: AttackSpec = field(default_factory=AttackSpec)
    teacher_arch: str | None = None
    student_arch: str | None = None
    teacher_file: str | None = None
    student_file: str | None = None
    synthesizer: str = "zskt"
    synth: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    batch_size: int | None = None
    eval_every: int | None = None
    seed: int = 0
    teacher_seed: int = 0
    cache_dir: str = ".abd_ray/cache"
    device: str = "auto"
    profile: str = "default"

    def with_profile(self) -> RunConfig:
        """A copy whose ``synth`` and ``defense_params`` hold the profile's values under the explicit ones.

        Raises:
            ValueError: an unknown profile, or a synthesizer it has no values for.
        """
        from abd_ray.profiles import profile_values

        synth, defense = profile_values(self.profile, self.synthesizer, self.dataset, self.defense)
        if not synth and not defense:
            return self
        return dataclasses.replace(
            self, synth={**synth, **self.synth}, defense_params={**defense, **self.defense_params}
        )

    def resolved(self) -> RunConfig:
        """A copy with the profile's values and every dataset default filled in."""
        d = dataset_info(self.dataset).defaults
        return dataclasses.replace(
            self.with_profile(),
            teacher_arch=self.teacher_arch or d.teacher_arch,
            student_arch=self.student_arch or d.student_arch,
            steps=self.steps if self.steps is not None else d.steps,
            batch_size=self.batch_size if self.batch_size is not None else d.batch_size,
            eval_every=self.eval_every if self.eval_every is not None else d.eval_every,
        )

    def teacher_spec(self) -> TeacherSpec:
        """The spec of the teacher this run distils from (the dataset's default recipe, this run's attack)."""
        return TeacherSpec.for_dataset(self.dataset, self.attack, arch=self.teacher_arch, seed=self.teacher_seed)

    # --- flat dicts ------------------------------------------------------------------------------------------------

    def to_flat(self) -> dict[str, Any]:
        """One flat dict: nested specs as ``attack.*``, ``synth.*``, ``defense.*`` keys.

        ``profile`` appears only when it is not ``default``, so a config without one flattens as it always did
        (trial params and checkpoints keep their keys).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "profile" and v == "default":
                continue
            if f.name == "attack":
                out.update({f"attack.{k}": x for k, x in asdict(v).items()})
            elif f.name == "synth":
                out.update({f"synth.{k}": x for k, x in v.items()})
            elif f.name == "defense_params":
                out.update({f"defense.{k}": x for k, x in v.items()})
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Build a config from a flat dict; an unknown key raises a ValueError listing the allowed ones."""
        top = {f.name for f in fields(cls)} - {"attack", "synth", "defense_params"}
        attack_keys = {f.name for f in fields(AttackSpec)}
        kw: dict[str, Any] = {}
        attack: dict[str, Any] = {}
        synth: dict[str, Any] = {}
        defense: dict[str, Any] = {}
        for k, v in flat.items():
            if k in top:
                kw[k] = v
            elif k.startswith("attack."):
                sub = k.split(".", 1)[1]
                if sub not in attack_keys:
                    raise ValueError(f"unknown key {k!r}; allowed attack keys: {', '.join(sorted(attack_keys))}")
                attack[sub] = v
            elif k.startswith("synth."):
                synth[k.split(".", 1)[1]] = v
            elif k.startswith("defense."):
                defense[k.split(".", 1)[1]] = v
            else:
                allowed = sorted(top) + ["attack.<key>", "synth.<key>", "defense.<key>"]
                raise ValueError(f"unknown key {k!r}; allowed: {', '.join(allowed)}")
        if "attack" not in kw and "target" not in attack and "dataset" in kw:
            attack.setdefault("target", dataset_info(kw["dataset"]).defaults.target)
        return cls(attack=AttackSpec(**attack), synth=synth, defense_params=defense, **kw)

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), sort_keys=True)


def parse_value(text: str) -> Any:
    """Parse a ``--set key=value`` value: JSON scalars (numbers, true/false, null) or a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into a flat dict (error names the bad pair)."""
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0].strip():
            raise ValueError(f"--set {p!r} is not key=value; e.g. --set defense.coef=0.1")
        k, v = p.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out
