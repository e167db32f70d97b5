"""Datasets as in-memory tensors in pixel space [0, 1], with the normalisation the models apply, and what is
known about each without loading it (:class:`DatasetInfo`: facts, run defaults, augmentation)."""

from abd_ray.data.datasets import DataBundle, load_dataset
from abd_ray.data.info import Augment, DatasetInfo, Defaults, blank_model, dataset_info, load_shape

__all__ = [
    "Augment",
    "DataBundle",
    "DatasetInfo",
    "Defaults",
    "blank_model",
    "dataset_info",
    "load_dataset",
    "load_shape",
]
