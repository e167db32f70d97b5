"""Backdoor attacks: triggers (ALGORITHMS.md section 1) and the one generic poisoning of a dataset.

Every module of this package is imported here, so a new attack is one new file that registers its trigger.
"""

from abd_ray.attacks.poison import AttackSpec, attack_names, make_trigger, poison_training_set, poisoned_test_set
from abd_ray.attacks.triggers import Trigger
from abd_ray.registry import import_package_modules

__all__ = [
    "AttackSpec",
    "Trigger",
    "attack_names",
    "make_trigger",
    "poison_training_set",
    "poisoned_test_set",
]

import_package_modules(__name__, __path__)
