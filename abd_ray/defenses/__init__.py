"""Defenses against backdoor transfer: none, and ABD's Shuffling Vaccine (sv), Self-Retrospection (sr), both (abd)."""

from abd_ray.defenses.base import Defense, build_defense

__all__ = ["Defense", "build_defense"]
