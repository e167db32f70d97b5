"""Dataset loaders.

Every dataset becomes a :class:`DataBundle` of float32 tensors in pixel space ``[0, 1]`` (N, C, H, W). Triggers
are applied in that space, and each classifier normalises its input with the bundle's ``mean`` / ``std`` as its
first operation, so synthesizers, triggers and perturbations all live in one valid range.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from abd_ray.data.info import CROP, CROP_FLIP, PAPER, Augment, DatasetInfo, Defaults, dataset_info, register_dataset
from abd_ray.registry import DATASETS


@dataclass(frozen=True)
class DataBundle:
    """A dataset held in memory.

    Attributes:
        name: registry name.
        x_train: training images in [0, 1], (N, C, H, W) float32.
        y_train: training labels, (N,) int64.
        x_test: test images in [0, 1].
        y_test: test labels.
        num_classes: number of classes.
        mean: per-channel mean the models subtract.
        std: per-channel std the models divide by.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def info(self) -> DatasetInfo:
        """The registered description of this dataset (defaults, augmentation)."""
        return dataset_info(self.name)


def load_dataset(name: str, root: str | os.PathLike | None = None) -> DataBundle:
    """Load dataset ``name`` into memory (cached per process).

    Args:
        name: a registered dataset name (see ``abd-ray list``).
        root: data root for the torchvision datasets; ignored by ``digits``. Defaults to ``$ABD_RAY_DATA``
            or ``./data``.
    """
    loader = DATASETS.get(name)
    if dataset_info(name).needs_root:
        root = Path(root or os.environ.get("ABD_RAY_DATA", "data")).expanduser().resolve()
        return _cached(loader, str(root))
    return _cached(loader, "")


@functools.lru_cache(maxsize=4)
def _cached(loader, root: str) -> DataBundle:
    return loader(root) if root else loader()


def _to_tensor(x_uint8_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _missing(name: str, expected: Path, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r}: {detail} under {expected}. {dataset_info(name).how_to_get} "
        f"Pass the folder that holds it with --data-root (or set ABD_RAY_DATA)."
    )


# --- digits: the embedded default -------------------------------------------------------------------------------


# Sized so that a teacher trains in seconds and a quickstart-budget distillation runs in minutes on two CPU cores.
# No augmentation: a shift of a pixel is an eighth of a digit, it would change the class.
_DIGITS = Defaults("cnn_l", "cnn_s", 30, 64, 0.05, 3000, 64, 250, 0)


@register_dataset(DatasetInfo("digits", (1, 8, 8), 10, False, "Shipped with scikit-learn.", _DIGITS, Augment(0, False)))
def _digits() -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    y = d.target.astype(np.int64)
    # A fixed, stratified 75/25 split: every run of every machine sees the same test set.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    return DataBundle(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        10,
        (mean,),
        (std,),
    )


# --- torchvision datasets ------------------------------------------------------------------------------------------


def _tv_load(cls, name: str, root: Path, split_kw: list[dict], files: list[str]) -> list:
    """Build torchvision datasets without their checksum gate, after checking that the files exist.

    torchvision refuses files whose MD5 differs from the published archives; we check presence ourselves (so a
    missing file gets a message that says where it was expected) and only warn on a checksum mismatch, so that
    re-packed or subset copies of a dataset load too.
    """
    from torchvision.datasets.utils import check_integrity

    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise _missing(name, root, f"missing {', '.join(missing)}")

    class _Lenient(cls):  # type: ignore[misc, valid-type]
        # Same loader, with every recorded MD5 dropped so that torchvision checks presence only.
        pass

    changed = False
    for attr in ("train_list", "test_list"):
        if hasattr(cls, attr):
            setattr(_Lenient, attr, [[f, None] for f, *_ in getattr(cls, attr)])
            changed = changed or any(
                not check_integrity(str(root / cls.base_folder / f), md5) for f, md5 in getattr(cls, attr)
            )
    if hasattr(cls, "meta") and isinstance(cls.meta, dict) and "md5" in cls.meta:
        _Lenient.meta = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):
        _Lenient.split_list = {k: [v[0], v[1], None] for k, v in cls.split_list.items()}
        changed = any(
            not check_integrity(str(root / v[1]), v[2]) for v in cls.split_list.values() if (root / v[1]).exists()
        )
    if changed:
        warnings.warn(f"{name}: files under {root} do not match the published checksums", stacklevel=3)

    out = []
    for kw in split_kw:
        try:
            out.append(_Lenient(str(root), download=False, **kw))
        except Exception as e:  # a partial or damaged copy: say which and where
            raise _missing(name, root, f"unreadable or partial files ({type(e).__name__}: {e})") from e
    return out


def _cifar(cls, name: str, folder: str, num_classes: int, mean, std, root: str) -> DataBundle:
    r = Path(root)
    names = [
        f"{folder}/{f}"
        for f in (
            ["train", "test"] if num_classes == 100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        )
    ]
    tr, te = _tv_load(cls, name, r, [{"train": True}, {"train": False}], names)
    return DataBundle(
        name,
        _to_tensor(tr.data),
        torch.tensor(tr.targets, dtype=torch.long),
        _to_tensor(te.data),
        torch.tensor(te.targets, dtype=torch.long),
        num_classes,
        mean,
        std,
    )


def _tv_info(name: str, cls: str, num_classes: int, expected: str, defaults: Defaults, augment: Augment) -> DatasetInfo:
    """The description of a 32x32 RGB torchvision dataset read from a data root."""
    how = f"torchvision downloads it where the network allows: torchvision.datasets.{cls}(ROOT, download=True)."
    return DatasetInfo(name, (3, 32, 32), num_classes, True, f"{how} Expected {expected}.", defaults, augment)


@register_dataset(_tv_info("cifar10", "CIFAR10", 10, "folder: ROOT/cifar-10-batches-py", PAPER, CROP_FLIP))
def _cifar10(root: str) -> DataBundle:
    from torchvision.datasets import CIFAR10

    return _cifar(
        CIFAR10, "cifar10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), root
    )


@register_dataset(_tv_info("cifar100", "CIFAR100", 100, "folder: ROOT/cifar-100-python", PAPER, CROP_FLIP))
def _cifar100(root: str) -> DataBundle:
    from torchvision.datasets import CIFAR100

    return _cifar(
        CIFAR100, "cifar100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), root
    )


@register_dataset(
    _tv_info(
        "svhn",
        "SVHN",
        10,
        "files: ROOT/train_32x32.mat, ROOT/test_32x32.mat",
        replace(PAPER, teacher_epochs=50, teacher_lr=0.05, steps=40000),
        CROP,
    )
)
def _svhn(root: str) -> DataBundle:
    from torchvision.datasets import SVHN

    tr, te = _tv_load(
        SVHN, "svhn", Path(root), [{"split": "train"}, {"split": "test"}], ["train_32x32.mat", "test_32x32.mat"]
    )
    return DataBundle(
        "svhn",
        torch.from_numpy(tr.data).float().div_(255.0),  # SVHN already stores N, C, H, W
        torch.from_numpy(tr.labels.astype(np.int64)),
        torch.from_numpy(te.data).float().div_(255.0),
        torch.from_numpy(te.labels.astype(np.int64)),
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
    )


# the paper's GTSRB runs used target 1
@register_dataset(
    _tv_info(
        "gtsrb", "GTSRB", 43, "folder: ROOT/gtsrb/GTSRB", replace(PAPER, teacher_epochs=50, steps=40000, target=1), CROP
    )
)
def _gtsrb(root: str) -> DataBundle:
    from torchvision import transforms
    from torchvision.datasets import GTSRB

    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    r = Path(root)
    need = ["gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"]
    missing = [f for f in need if not (r / f).exists()]
    if missing:
        raise _missing("gtsrb", r, f"missing {', '.join(missing)}")
    splits = []
    for split in ("train", "test"):
        ds = GTSRB(str(r), split=split, transform=tf, download=False)
        xs, ys = zip(*[ds[i] for i in range(len(ds))], strict=True) if len(ds) else ((), ())
        if not xs:
            raise _missing("gtsrb", r, f"no {split} images")
        splits.append((torch.stack(xs), torch.tensor(ys, dtype=torch.long)))
    (x_tr, y_tr), (x_te, y_te) = splits
    return DataBundle("gtsrb", x_tr, y_tr, x_te, y_te, 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669))
