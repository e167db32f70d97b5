"""Triggers land where ALGORITHMS.md says, deterministically, in range; poisoning follows its rules."""

import numpy as np
import pytest
import torch

from abd_ray.attacks import AttackSpec, make_trigger, poison_training_set, poisoned_test_set
from abd_ray.attacks.poison import pgd
from abd_ray.registry import ATTACKS

SHAPES = [(1, 8, 8), (3, 32, 32)]
NAMES = ATTACKS.names()


@pytest.mark.parametrize("name", NAMES)
def test_poisoning_follows_the_trigger_label_rule(name):
    """Dirty-label triggers relabel non-target samples to the target; clean-label ones stamp target samples only
    and keep every label (ALGORITHMS.md section 1)."""
    y = torch.arange(200) % 10
    x = torch.rand(200, 1, 8, 8) * 0.8 + 0.1
    spec = AttackSpec(name, target=2, poison_ratio=0.1)
    t = make_trigger(spec, (1, 8, 8))
    assert t.name == name
    xp, yp, idx = poison_training_set(x, y, t, spec)
    assert len(idx) == 20 and (yp[idx] == 2).all() and torch.equal(xp[idx], t.apply(x[idx]))
    if t.clean_label:
        assert (y[idx] == 2).all() and torch.equal(yp, y)
    else:
        assert (y[idx] != 2).all()


@pytest.mark.parametrize("shape", SHAPES, ids=["8x8x1", "32x32x3"])
@pytest.mark.parametrize("name", NAMES)
def test_trigger_changes_only_its_pixels_and_stays_in_range(name, shape):
    t = make_trigger(AttackSpec(name), shape)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, *shape, generator=g) * 0.8 + 0.1  # away from the clip bounds so every pixel can move
    y = t.apply(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    changed = (y != x).any(1, keepdim=True)
    if t.mode != "add_rescale":  # a rescale moves every pixel by design
        assert not (changed & (t.mask == 0)).any(), "pixels outside the trigger mask changed"
    assert changed.any(), "the trigger changed nothing"
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_trigger_is_deterministic_from_seed(name):
    shape = (3, 32, 32)
    a, b = make_trigger(AttackSpec(name, seed=3), shape), make_trigger(AttackSpec(name, seed=3), shape)
    assert torch.equal(a.pattern, b.pattern) and torch.equal(a.mask, b.mask)
    x = torch.rand(4, *shape)
    assert torch.equal(a.apply(x), b.apply(x))


def test_random_patterns_depend_on_seed():
    for name in ("blend", "trojan_3x3", "trojan_8x8", "trojan_wm", "l0_inv", "l2_inv", "smooth"):
        a = make_trigger(AttackSpec(name, seed=0), (3, 32, 32))
        b = make_trigger(AttackSpec(name, seed=1), (3, 32, 32))
        assert not (torch.equal(a.pattern, b.pattern) and torch.equal(a.mask, b.mask)), name


def test_badnet_grid_geometry():
    # CIFAR geometry: a 3x3 checkerboard one pixel from the bottom-right corner; flush in the corner at 8x8.
    t = make_trigger(AttackSpec("badnet_grid"), (3, 32, 32))
    rows, cols = torch.nonzero(t.mask[0], as_tuple=True)
    assert rows.tolist() == [28] * 3 + [29] * 3 + [30] * 3 and sorted(set(cols.tolist())) == [28, 29, 30]
    assert t.pattern[:, 28, 28].eq(1).all() and t.pattern[:, 28, 29].eq(0).all()
    t8 = make_trigger(AttackSpec("badnet_grid"), (1, 8, 8))
    assert t8.mask[0, 5:, 5:].all() and t8.mask.sum() == 9
    x = torch.full((1, 1, 8, 8), 0.5)
    assert torch.equal(t8.apply(x)[0, 0, 5:, 5:], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))


def test_blend_and_sig_formulas():
    x = torch.rand(2, 3, 32, 32)
    b = make_trigger(AttackSpec("blend"), (3, 32, 32))
    assert torch.allclose(b.apply(x), (0.8 * x + 0.2 * b.pattern).clamp(0, 1), atol=1e-6)
    s = make_trigger(AttackSpec("sig"), (3, 32, 32))
    assert s.clean_label and torch.allclose(s.apply(x), 0.8 * x + 0.2 * s.pattern, atol=1e-6)
    assert torch.equal(s.pattern[:, 0], s.pattern[:, 17])  # horizontal sinusoid: constant down each column


def test_cl_stamps_all_four_corners():
    t = make_trigger(AttackSpec("cl"), (3, 32, 32))
    m = t.mask[0]
    assert t.clean_label and m[:4, :4].any() and m[:4, -4:].any() and m[-4:, :4].any() and m[-4:, -4:].any()
    assert m.sum() == 36


def test_dirty_label_poisoning_rules():
    y = torch.arange(100) % 10
    x = torch.rand(100, 1, 8, 8)
    spec = AttackSpec("badnet_grid", target=0, poison_ratio=0.1, seed=0)
    t = make_trigger(spec, (1, 8, 8))
    xp, yp, idx = poison_training_set(x, y, t, spec)
    assert len(idx) == 10 and (y[idx] != 0).all() and (yp[idx] == 0).all()
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(xp[rest], x[rest]) and torch.equal(yp[rest], y[rest])
    assert torch.equal(xp[idx], t.apply(x[idx]))
    # the same seed picks the same samples
    assert torch.equal(poison_training_set(x, y, t, spec)[2], idx)


def test_clean_label_poisoning_is_capped_and_keeps_labels():
    y = torch.arange(100) % 10  # 10 samples of the target class
    x = torch.rand(100, 3, 32, 32)
    spec = AttackSpec("sig", target=3, poison_ratio=0.5)
    xp, yp, idx = poison_training_set(x, y, make_trigger(spec, (3, 32, 32)), spec)
    assert len(idx) == 10 and (y[idx] == 3).all() and torch.equal(yp, y)


def test_poisoned_test_set_excludes_target_and_keeps_true_labels():
    y = torch.tensor([0, 1, 2, 0, 3])
    x = torch.rand(5, 1, 8, 8)
    t = make_trigger(AttackSpec("badnet_sq"), (1, 8, 8))
    xp, yt = poisoned_test_set(x, y, t, target=0)
    assert yt.tolist() == [1, 2, 3] and 0 not in yt.tolist()
    assert torch.equal(xp, t.apply(x[[1, 2, 4]]))


def test_pgd_stays_in_linf_ball_and_range():
    from abd_ray.models import build_model

    torch.manual_seed(0)
    m = build_model("cnn_s", num_classes=10, shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    adv = pgd(m, x, y, eps=16 / 255, steps=3)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_user_pattern_files(tmp_path):
    from PIL import Image

    pat = np.zeros((32, 32, 3), dtype=np.uint8)
    pat[2:6, 2:6] = 255
    Image.fromarray(pat).save(tmp_path / "p.png")
    t = make_trigger(AttackSpec("badnet_sq", pattern_file=str(tmp_path / "p.png")), (3, 32, 32))
    assert t.mask.sum() == 16 and t.mask[0, 2:6, 2:6].all()
    x = torch.zeros(1, 3, 32, 32)
    assert t.apply(x)[0, :, 2:6, 2:6].eq(1).all() and t.apply(x)[0, :, 10:, 10:].eq(0).all()
    # NPY pattern + explicit mask, resized to 8x8 grey
    np.save(tmp_path / "p.npy", np.full((16, 16), 0.7, dtype=np.float32))
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[:4, :4] = 1
    np.save(tmp_path / "m.npy", mask)
    t2 = make_trigger(
        AttackSpec("blend", pattern_file=str(tmp_path / "p.npy"), mask_file=str(tmp_path / "m.npy")), (1, 8, 8)
    )
    assert t2.mask.sum() == 4 and torch.allclose(t2.pattern, torch.full((1, 8, 8), 0.7))


def test_bad_pattern_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        AttackSpec("blend", pattern_file=str(tmp_path / "nope.png")).validate()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read"):
        make_trigger(AttackSpec("blend", pattern_file=str(tmp_path / "bad.png")), (3, 32, 32))
    (tmp_path / "p.txt").write_text("1")
    with pytest.raises(ValueError, match="allowed: .png, .npy"):
        make_trigger(AttackSpec("blend", pattern_file=str(tmp_path / "p.txt")), (3, 32, 32))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="nope"), "unknown attack 'nope'; known attacks: none, badnet_grid"),
        (dict(poison_ratio=0.0), r"outside \(0, 1\]"),
        (dict(poison_ratio=1.5), r"outside \(0, 1\]"),
        (dict(poison_ratio=True), r"outside \(0, 1\]"),  # a YAML true is not a ratio
        (dict(target=10), r"not a class; allowed: 0..9"),
        (dict(target=-1), r"not a class"),
    ],
)
def test_attack_spec_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        AttackSpec(**kw).validate(num_classes=10)
