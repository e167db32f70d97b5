"""Backdoor attacks: triggers (ALGORITHMS.md section 1) and the one generic poisoning of a dataset."""

from abd_ray.attacks import triggers  # noqa: F401  (registration)
from abd_ray.attacks.poison import AttackSpec, attack_names, make_trigger, poison_training_set, poisoned_test_set
from abd_ray.attacks.triggers import Trigger

__all__ = [
    "AttackSpec",
    "Trigger",
    "attack_names",
    "make_trigger",
    "poison_training_set",
    "poisoned_test_set",
]
