"""The one generic poisoning of a dataset, and the poisoned test set (ALGORITHMS.md section 1)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.attacks.triggers import Trigger, with_pattern_file
from abd_ray.registry import ATTACKS


def attack_names() -> list[str]:
    """Every attack name a config accepts: ``none`` (a clean teacher) and the registered triggers."""
    return ["none", *ATTACKS.names()]


@dataclass(frozen=True)
class AttackSpec:
    """What the attacker did to the teacher's training set.

    Attributes:
        name: a trigger name, or ``none`` for a clean teacher.
        target: the attacker's target class (the paper: 0; GTSRB runs used 1).
        poison_ratio: poisoned fraction of the whole training set (0.1 in the paper).
        seed: seed of the trigger pattern and of the poisoned index set.
        pattern_file: optional PNG/NPY that replaces the procedural pattern.
        mask_file: optional PNG/NPY mask of the pixels the pattern changes.
    """

    name: str = "badnet_grid"
    target: int = 0
    poison_ratio: float = 0.1
    seed: int = 0
    pattern_file: str | None = None
    mask_file: str | None = None

    def validate(self, num_classes: int | None = None) -> None:
        """Raise a ValueError that names the bad field and the allowed values."""
        if self.name != "none" and self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; known attacks: {', '.join(attack_names())}")
        ratio = self.poison_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise ValueError(f"attack.poison_ratio={self.poison_ratio!r} is outside (0, 1]; e.g. 0.1")
        if (
            not isinstance(self.target, int)
            or isinstance(self.target, bool)
            or self.target < 0
            or (num_classes is not None and self.target >= num_classes)
        ):
            hi = f"{num_classes - 1}" if num_classes else "num_classes - 1"
            raise ValueError(f"attack.target={self.target!r} is not a class; allowed: 0..{hi}")
        for key in ("pattern_file", "mask_file"):
            f = getattr(self, key)
            if f is not None and not Path(f).exists():
                raise ValueError(f"attack.{key}={f!r} does not exist; give the path of a PNG or NPY file")

    @property
    def active(self) -> bool:
        return self.name != "none"

    def fingerprint(self) -> dict[str, Any]:
        """The spec as hashed for caches: pattern files by content, not by path."""
        d = asdict(self)
        for key in ("pattern_file", "mask_file"):
            if d[key] is not None:
                d[key] = hashlib.sha256(Path(d[key]).read_bytes()).hexdigest()
        return d


def make_trigger(spec: AttackSpec, shape: Sequence[int]) -> Trigger:
    """The trigger of ``spec`` at image shape (C, H, W), with the user's pattern file if one is given."""
    if not spec.active:
        raise ValueError("attack 'none' has no trigger")
    trigger = ATTACKS.build(spec.name, tuple(shape), spec.seed)
    return with_pattern_file(trigger, spec.pattern_file, spec.mask_file)


def poison_training_set(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    spec: AttackSpec,
    adversary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Poison a training set.

    Dirty-label attacks stamp ``round(poison_ratio * N)`` non-target samples (capped at their number) and
    relabel them to the target; clean-label attacks stamp target-class samples only (capped at their number) and
    keep the labels. ``adversary`` (for an adversarial trigger, ``cl``) first makes the chosen images hard to classify.

    Returns:
        The poisoned images, labels, and the sorted poisoned indices.
    """
    candidates = torch.nonzero(y == spec.target if trigger.clean_label else y != spec.target).flatten()
    n = min(round(spec.poison_ratio * len(y)), len(candidates))
    g = torch.Generator().manual_seed(spec.seed)
    idx = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
    x_p, y_p = x.clone(), y.clone()
    chosen = x[idx]
    if adversary is not None and n > 0:
        chosen = adversary(chosen, y[idx])
    x_p[idx] = trigger.apply(chosen)
    y_p[idx] = spec.target
    return x_p, y_p, idx


def poisoned_test_set(
    x_test: torch.Tensor, y_test: torch.Tensor, trigger: Trigger, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every test image whose label is not the target, with the trigger; returned with its TRUE labels."""
    keep = y_test != target
    return trigger.apply(x_test[keep]), y_test[keep]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 16 / 255,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Untargeted L-inf PGD (Madry et al. 2018) in pixel space [0, 1]: images the model finds hard.

    Used by the ``cl`` attack (Turner et al. 2019: eps 16/255 on a clean model).
    """
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        adv = xb.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), yb)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step_size * grad.sign()
            adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(0, 1)
        out.append(adv.detach().cpu())
    model.train(was_training)
    return torch.cat(out) if out else x.clone()
