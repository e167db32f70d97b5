import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_cifar10(root, n_train_per_batch: int = 40, n_test: int = 60, seed: int = 0):
    """A small CIFAR-10 in torchvision's on-disk layout (pickled batches of uint8 rows)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n):
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train_per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar10(tmp_path / "data")


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default digits teacher (badnet_grid), trained once per test session."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    cache = tmp_path_factory.mktemp("cache")
    return get_teacher(TeacherSpec.for_dataset("digits"), cache, progress=False), cache
