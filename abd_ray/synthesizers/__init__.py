"""Synthesizers of data-free KD (ALGORITHMS.md section 3), behind one interface, in the SYNTHESIZERS registry.

``zskt``, ``dfad``, ``dafl`` (generators), ``deepinversion``, ``cmi`` (inversion into a memory bank), ``ood``
(patches of a natural image) and ``clean`` (real clean data, the reference point).
"""

from abd_ray.synthesizers import clean, cmi, dafl, deepinversion, dfad, ood, zskt  # noqa: F401  (registration)
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer

__all__ = ["Batch", "SynthContext", "Synthesizer", "synthesizer_class"]


def synthesizer_class(name: str) -> type[Synthesizer]:
    """The registered synthesizer class ``name``; an unknown name raises a ValueError listing the known ones."""
    from abd_ray.registry import SYNTHESIZERS

    return SYNTHESIZERS.get(name)
