"""Synthesizers of data-free KD (ALGORITHMS.md section 3), behind one interface, in the SYNTHESIZERS registry.

``zskt``, ``dfad``, ``dafl`` (generators), ``deepinversion``, ``cmi`` (inversion into a memory bank), ``ood``
(patches of a natural image) and ``clean`` (real clean data, the reference point). Every module of this package is
imported here, so a new synthesizer is one new file that registers itself.
"""

from abd_ray.registry import import_package_modules
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer

__all__ = ["Batch", "SynthContext", "Synthesizer", "synthesizer_class"]

import_package_modules(__name__, __path__)


def synthesizer_class(name: str) -> type[Synthesizer]:
    """The registered synthesizer class ``name``; an unknown name raises a ValueError listing the known ones."""
    from abd_ray.registry import SYNTHESIZERS

    return SYNTHESIZERS.get(name)
