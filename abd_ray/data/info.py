"""What is known about a dataset without loading it: its facts, the run defaults that fit it, its augmentation.

One :class:`DatasetInfo` per registered dataset is the only table of per-dataset facts: the config, the teacher,
the synthesizers and the CLI all read it, and an unknown name is an error that lists the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from abd_ray.registry import DATASETS


@dataclass(frozen=True)
class Defaults:
    """A dataset's default run: the teacher's recipe and the distillation budget."""

    teacher_arch: str
    student_arch: str
    teacher_epochs: int
    teacher_batch: int
    teacher_lr: float
    steps: int
    batch_size: int
    eval_every: int
    target: int


@dataclass(frozen=True)
class Augment:
    """The dataset's standard training augmentation: a random shift of up to ``pad`` pixels (zero fill, the
    pad-and-crop of the CIFAR recipe) and, if ``flip``, a random horizontal flip."""

    pad: int
    flip: bool


# The paper's WRN-16-2 -> WRN-16-1 setting (CIFAR-10).
PAPER = Defaults("wrn16_2", "wrn16_1", 100, 128, 0.1, 80000, 128, 2000, 0)
# Pad-4 crop and flip (CIFAR), pad-4 crop only where a mirror image is another sign or digit (GTSRB, SVHN).
CROP_FLIP = Augment(4, True)
CROP = Augment(4, False)


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    Attributes:
        name: registry name.
        shape: (channels, height, width) of one image.
        num_classes: number of classes.
        needs_root: whether it is read from a data root (torchvision's on-disk format).
        how_to_get: how a user obtains the files, for the missing-data error.
        defaults: the run defaults that fit it.
        augment: its standard training augmentation (teacher training and KD on real images).
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    needs_root: bool
    how_to_get: str
    defaults: Defaults
    augment: Augment


def register_dataset(info: DatasetInfo):
    """Decorator: register a loader (``loader(root)``, or ``loader()`` when ``info.needs_root`` is false) with
    its description."""
    return DATASETS.register(info.name, info=info)


def dataset_info(name: str) -> DatasetInfo:
    """The description of a registered dataset; an unknown name raises a ValueError listing the known ones."""
    return DATASETS.meta(name)["info"]


def load_shape(dataset: str) -> tuple[int, int, int]:
    """(channels, height, width) of the dataset's images, without loading them."""
    return dataset_info(dataset).shape


def blank_model(arch: str, dataset: str) -> nn.Module:
    """A classifier of ``arch`` for ``dataset`` on the meta device: its structure, with no storage and no compute."""
    from abd_ray.models import build_model

    info = dataset_info(dataset)
    with torch.device("meta"):
        return build_model(arch, num_classes=info.num_classes, shape=info.shape, mean=(0.0,), std=(1.0,))
