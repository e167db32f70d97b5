"""Dataset loaders: the embedded digits, and the real torchvision loaders on small files the tests write."""

import pickle

import numpy as np
import pytest
import torch

from abd_ray.config import RunConfig, TeacherSpec, dataset_defaults
from abd_ray.data import Augment, dataset_info, load_dataset
from abd_ray.data.augment import kd_augment, shift_flip, unchanged_by
from abd_ray.data.datasets import _cached
from abd_ray.data.fake import write_cifar10
from abd_ray.models import classifier_names
from abd_ray.registry import DATASETS


@pytest.fixture(autouse=True)
def _fresh_cache():
    _cached.cache_clear()
    yield
    _cached.cache_clear()


def test_digits_split_is_fixed_stratified_and_in_range():
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797 and len(d.x_test) == 450
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1 and d.x_train.dtype == torch.float32
    # stratified: every class's share of the test set within one sample of its share overall
    counts = torch.bincount(d.y_test, minlength=10).float()
    overall = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10).float() * 450 / 1797
    assert (counts - overall).abs().max() <= 1.0
    _cached.cache_clear()
    d2 = load_dataset("digits")
    assert torch.equal(d.x_test, d2.x_test) and torch.equal(d.y_train, d2.y_train)


def test_cifar10_real_loader_on_written_files(tmp_path):
    root = write_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=60)
    with pytest.warns(UserWarning, match="checksums"):
        d = load_dataset("cifar10", root)
    assert d.x_train.shape == (200, 3, 32, 32) and d.x_test.shape == (60, 3, 32, 32)
    assert d.num_classes == 10 and len(d.mean) == 3
    raw = pickle.load(open(root / "cifar-10-batches-py" / "data_batch_1", "rb"))  # noqa: SIM115
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(d.x_train[0], first)
    assert d.y_train[:40].tolist() == raw["labels"]


def test_cifar100_and_svhn_real_loaders(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 30), ("test", 20)):
        with open(c100 / split, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, n).tolist(),
                    "coarse_labels": rng.integers(0, 20, n).tolist(),
                },
                f,
            )
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    for split, n in (("train", 25), ("test", 15)):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1))},
        )
    with pytest.warns(UserWarning):
        d = load_dataset("cifar100", tmp_path)
    assert d.x_train.shape == (30, 3, 32, 32) and d.num_classes == 100
    with pytest.warns(UserWarning):
        s = load_dataset("svhn", tmp_path)
    assert s.x_test.shape == (15, 3, 32, 32) and s.y_train.max() <= 9 and s.y_train.min() >= 0


def test_gtsrb_real_loader_on_written_files(tmp_path):
    from PIL import Image

    base = tmp_path / "gtsrb"
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 37, 3), dtype=np.uint8)).save(folder / f"{i}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30, 33, 3), dtype=np.uint8)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;33;30;0;0;33;30;{i % 3}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    d = load_dataset("gtsrb", tmp_path)
    assert d.x_train.shape == (12, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32) and d.num_classes == 43
    assert d.y_test.tolist() == [0, 1, 2, 0, 1]


def test_missing_data_root_names_folder_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", tmp_path / "nowhere")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "nowhere" in msg and "download=True" in msg and "--data-root" in msg


def test_partial_data_root(tmp_path):
    root = write_cifar10(tmp_path / "data")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing cifar-10-batches-py/data_batch_3"):
        load_dataset("cifar10", root)
    # a truncated batch file: a clear error, not a pickle traceback
    root2 = write_cifar10(tmp_path / "data2")
    f = root2 / "cifar-10-batches-py" / "data_batch_2"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FileNotFoundError, match="unreadable or partial"), pytest.warns(UserWarning):
        load_dataset("cifar10", root2)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: cifar10, cifar100, digits"):
        dataset_info("mnist")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_describes_its_defaults_and_augmentation(name):
    info = dataset_info(name)
    d = info.defaults
    assert {d.teacher_arch, d.student_arch} <= set(classifier_names())
    assert 0 <= d.target < info.num_classes and min(d.steps, d.batch_size, d.eval_every, d.teacher_epochs) > 0
    # a shift must leave most of the image: pad at most an eighth of a side
    assert 0 <= info.augment.pad <= info.shape[1] // 8
    assert RunConfig(dataset=name).resolved().steps == d.steps
    assert TeacherSpec.for_dataset(name).arch == d.teacher_arch


def test_unknown_dataset_is_an_error_everywhere():
    for call in (lambda: RunConfig(dataset="mnist").resolved(), lambda: TeacherSpec.for_dataset("mnist"),
                 lambda: RunConfig.from_flat({"dataset": "mnist"}), lambda: dataset_defaults("mnist")):
        with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: cifar10"):
            call()


def _reference_shift_flip(x, gen, pad, flip, rows_first):
    """Pad-and-crop then flip, one sample at a time, drawing what shift_flip is documented to draw."""
    n, _, h, w = x.shape
    first = torch.randint(-pad, pad + 1, (n,), generator=gen) if pad else torch.zeros(n, dtype=torch.long)
    second = torch.randint(-pad, pad + 1, (n,), generator=gen) if pad else torch.zeros(n, dtype=torch.long)
    dy, dx = (first, second) if rows_first else (second, first)
    flips = torch.rand(n, generator=gen) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = []
    for i in range(n):
        crop = xp[i, :, pad + dy[i] : pad + dy[i] + h, pad + dx[i] : pad + dx[i] + w]
        out.append(crop.flip(2) if flips[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("rows_first", [False, True], ids=["synthesizers", "teacher"])
@pytest.mark.parametrize("pad, flip", [(4, True), (4, False), (0, True), (2, True)])
def test_shift_flip_is_pad_crop_flip_with_its_draws(pad, flip, rows_first):
    x = torch.rand(64, 3, 32, 28, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = shift_flip(x, g1, pad, flip, rows_first=rows_first)
    assert torch.equal(got, _reference_shift_flip(x, g2, pad, flip, rows_first))
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws, no more


def test_kd_augment_follows_the_dataset():
    digits = load_dataset("digits")
    assert kd_augment(digits) == {"pad": 0, "flip": False} and unchanged_by(kd_augment(digits))
    assert dataset_info("cifar10").augment == Augment(4, True) and dataset_info("gtsrb").augment == Augment(4, False)
    x = digits.x_train[:8]
    assert shift_flip(x, torch.Generator(), **kd_augment(digits)) is x
