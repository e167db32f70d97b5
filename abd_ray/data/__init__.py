"""Datasets as in-memory tensors in pixel space [0, 1], with the normalisation the models apply."""

from abd_ray.data.datasets import DataBundle, dataset_info, load_dataset

__all__ = ["DataBundle", "dataset_info", "load_dataset"]
