"""Defenses against backdoor transfer: none, and ABD's Shuffling Vaccine (sv), Self-Retrospection (sr), both (abd).

Hong et al., "Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023. Every module of this
package is imported here, so a new defense is one new file that registers itself.
"""

from abd_ray.defenses.abd import ABD
from abd_ray.defenses.base import Defense, build_defense
from abd_ray.defenses.hypergrad import fixed_point_hypergrad
from abd_ray.defenses.retrospection import SelfRetrospection
from abd_ray.defenses.vaccine import ShufflingVaccine
from abd_ray.registry import import_package_modules

__all__ = [
    "ABD",
    "Defense",
    "SelfRetrospection",
    "ShufflingVaccine",
    "build_defense",
    "fixed_point_hypergrad",
]

import_package_modules(__name__, __path__)
