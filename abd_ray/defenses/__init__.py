"""Defenses against backdoor transfer: none, and ABD's Shuffling Vaccine (sv), Self-Retrospection (sr), both (abd).

Hong et al., "Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023.
"""

from abd_ray.defenses import abd, retrospection, vaccine  # noqa: F401  (registration)
from abd_ray.defenses.abd import ABD
from abd_ray.defenses.base import Defense, build_defense
from abd_ray.defenses.hypergrad import fixed_point_hypergrad
from abd_ray.defenses.retrospection import SelfRetrospection
from abd_ray.defenses.vaccine import ShufflingVaccine

__all__ = [
    "ABD",
    "Defense",
    "SelfRetrospection",
    "ShufflingVaccine",
    "build_defense",
    "fixed_point_hypergrad",
]
