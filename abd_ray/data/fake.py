"""Small datasets in torchvision's on-disk format, written for tests and benchmarks so that the real loaders run
where the real files cannot be downloaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: str | os.PathLike, n_train_per_batch: int = 40, n_test: int = 60, seed: int = 0) -> Path:
    """A CIFAR-10 of random pixels and labels under ``root/cifar-10-batches-py`` (five pickled training batches,
    a test batch, the label names); returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train_per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root
