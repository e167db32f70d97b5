"""Classifiers and generators, all in the MODELS registry."""

from abd_ray.models import classifiers, generators  # noqa: F401  (registration)
from abd_ray.models.base import Classifier, build_model, classifier_names, conv_layers, generator_names

__all__ = ["Classifier", "build_model", "classifier_names", "conv_layers", "generator_names"]
