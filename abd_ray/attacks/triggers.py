"""The eleven triggers of ALGORITHMS.md section 1, made procedurally and deterministically from a seed.

Geometry follows the paper's CIFAR-10 setting (32x32) and is scaled to other resolutions by ``H / 32`` with a
floor that keeps a patch recognisable at 8x8. A trigger is one of four operations on pixel-space images in
[0, 1], always followed by clipping to [0, 1]:

- ``paste``: ``x * (1 - m) + p * m`` (BadNets, Gu et al. 2017; the sparse "inverted" l0 trigger);
- ``blend``: ``(1 - a) * x + a * p`` (Chen et al. 2017 blend; SIG, Barni et al. 2019);
- ``add``: ``x + p * m`` (Trojan patches and watermark, Liu et al. 2018; the dense l2 trigger);
- ``add_rescale``: ``x + p``, then each image min-max rescaled to [0, 1] (smooth trigger, Zeng et al. 2021).

The published pattern images are not shipped; a user's own pattern (and mask) file may replace ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from abd_ray.registry import ATTACKS

MODES = ("paste", "blend", "add", "add_rescale")


@dataclass(frozen=True, eq=False)
class Trigger:
    """A trigger: a pattern, a mask of the pixels it may change, and how it combines with an image.

    Attributes:
        name: attack name.
        mode: one of ``paste``, ``blend``, ``add``, ``add_rescale``.
        pattern: (C, H, W) pattern.
        mask: (1, H, W) float mask in {0, 1}; the pixels the trigger may change.
        alpha: blend weight of the pattern (``blend`` only).
        clean_label: poison only target-class samples and keep their labels.
        adversarial: the poisoning first makes the chosen images hard to classify (PGD on a clean model).
    """

    name: str
    mode: str
    pattern: torch.Tensor
    mask: torch.Tensor
    alpha: float = 0.2
    clean_label: bool = False
    adversarial: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the trigger to a batch (N, C, H, W) in [0, 1]; returns a new tensor in [0, 1]."""
        p = self.pattern.to(x.device, x.dtype)
        m = self.mask.to(x.device, x.dtype)
        if self.mode == "paste":
            y = x * (1 - m) + p * m
        elif self.mode == "blend":
            y = x * (1 - self.alpha * m) + self.alpha * p * m
        elif self.mode == "add":
            y = x + p * m
        elif self.mode == "add_rescale":
            y = x + p * m
            lo = y.flatten(1).amin(1).view(-1, 1, 1, 1)
            hi = y.flatten(1).amax(1).view(-1, 1, 1, 1)
            y = (y - lo) / (hi - lo).clamp_min(1e-8)
        else:  # pragma: no cover - guarded at construction
            raise AssertionError(self.mode)
        return y.clamp(0.0, 1.0)

    def __post_init__(self) -> None:
        assert self.mode in MODES, self.mode
        assert self.pattern.dim() == 3 and self.mask.shape == (1, *self.pattern.shape[1:])

    def preview(self) -> torch.Tensor:
        """The trigger applied to a mid-grey image, (C, H, W), for pictures."""
        return self.apply(torch.full((1, *self.pattern.shape), 0.5))[0]


# --- helpers ---------------------------------------------------------------------------------------------------------


def _rng(name: str, seed: int) -> torch.Generator:
    # Each attack gets its own stream from one seed, the same on every machine (no Python hash randomisation).
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _size(k: int, h: int, floor: int = 3) -> int:
    """A CIFAR-geometry length ``k`` scaled to height ``h``, at least ``min(k, floor)``."""
    return max(round(k * h / 32), min(k, floor))


def _corner_box(shape: Sequence[int], size: int, margin: int) -> tuple[slice, slice]:
    _, h, w = shape
    r0, c0 = h - margin - size, w - margin - size
    return slice(r0, r0 + size), slice(c0, c0 + size)


def _checker(size: int, c: int) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((ii + jj) % 2 == 0).float().expand(c, size, size)  # white on even cells, black on odd


def _empty(shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    c, h, w = shape
    return torch.zeros(c, h, w), torch.zeros(1, h, w)


def _low_freq(g: torch.Generator, shape: Sequence[int], cells: int) -> torch.Tensor:
    c, h, w = shape
    coarse = torch.rand(1, c, cells, cells, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]


# --- the triggers ----------------------------------------------------------------------------------------------------


def _grid(shape, seed, corners=("br",)) -> tuple[torch.Tensor, torch.Tensor]:
    c, h, w = shape
    size, margin = _size(3, h), round(h / 32)
    p, m = _empty(shape)
    for corner in corners:
        rs, cs = _corner_box(shape, size, margin)
        if corner[0] == "t":
            rs = slice(margin, margin + size)
        if corner[1] == "l":
            cs = slice(margin, margin + size)
        p[:, rs, cs] = _checker(size, c)
        m[:, rs, cs] = 1
    return p, m


@ATTACKS.register("badnet_grid")
def badnet_grid(shape: Sequence[int], seed: int = 0) -> Trigger:
    """3x3 black/white checkerboard in the bottom-right corner (BadNets)."""
    p, m = _grid(shape, seed)
    return Trigger("badnet_grid", "paste", p, m)


@ATTACKS.register("badnet_sq")
def badnet_sq(shape: Sequence[int], seed: int = 0) -> Trigger:
    """White 4x4 square one pixel (scaled) from the bottom-right corner (BadNets)."""
    _, h, _ = shape
    p, m = _empty(shape)
    rs, cs = _corner_box(shape, _size(4, h), max(1, round(h / 32)))
    p[:, rs, cs] = 1.0
    m[:, rs, cs] = 1
    return Trigger("badnet_sq", "paste", p, m)


@ATTACKS.register("blend")
def blend(shape: Sequence[int], seed: int = 0) -> Trigger:
    """``0.8 x + 0.2 pattern`` with a fixed full-image random pattern (Chen et al. 2017)."""
    p = torch.rand(*shape, generator=_rng("blend", seed))
    return Trigger("blend", "blend", p, torch.ones(1, *shape[1:]), alpha=0.2)


@ATTACKS.register("sig")
def sig(shape: Sequence[int], seed: int = 0) -> Trigger:
    """Clean-label ``0.8 x + 0.2 s``, ``s`` a horizontal sinusoid (6 periods across the image) in [0, 1]."""
    c, h, w = shape
    s = 0.5 + 0.5 * torch.sin(2 * torch.pi * 6 * torch.arange(w) / w)
    return Trigger("sig", "blend", s.view(1, 1, w).expand(c, h, w).clone(), torch.ones(1, h, w), 0.2, True)


def _trojan_patch(name: str, shape, seed: int, k: int) -> Trigger:
    c, h, _ = shape
    size = _size(k, h)
    p, m = _empty(shape)
    rs, cs = _corner_box(shape, size, max(1, round(h / 32)) if size < h - 2 else 0)
    g = _rng(name, seed)
    # An "optimised-looking" patch: saturated, high-contrast values, as trigger-inversion patches are.
    p[:, rs, cs] = (torch.rand(c, size, size, generator=g) > 0.5).float() * 0.7 + 0.3 * torch.rand(
        c, size, size, generator=g
    )
    m[:, rs, cs] = 1
    return Trigger(name, "add", p, m)


@ATTACKS.register("trojan_3x3")
def trojan_3x3(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A fixed 3x3 (scaled) patch added near the bottom-right corner (TrojanNN)."""
    return _trojan_patch("trojan_3x3", shape, seed, 3)


@ATTACKS.register("trojan_8x8")
def trojan_8x8(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A fixed 8x8 (scaled) patch added near the bottom-right corner (TrojanNN)."""
    return _trojan_patch("trojan_8x8", shape, seed, 8)


@ATTACKS.register("trojan_wm")
def trojan_wm(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A watermark-like full-image pattern of thin strokes, added to the image (TrojanNN watermark)."""
    c, h, w = shape
    g = _rng("trojan_wm", seed)
    strokes = torch.zeros(h, w)
    n = max(2, round(4 * h / 32))
    for _ in range(n):  # axis-aligned strokes of random position and length, as a rendered glyph has
        r, col = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        length = int(torch.randint(max(2, h // 4), max(3, h // 2), (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:
            strokes[r, col : col + length] = 1
        else:
            strokes[r : r + length, col] = 1
    p = 0.5 * strokes.expand(c, h, w).clone()
    return Trigger("trojan_wm", "add", p, (strokes > 0).float().unsqueeze(0))


@ATTACKS.register("l0_inv")
def l0_inv(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A sparse trigger: a few pixels (1% of them, at least 3) pasted with fixed values (L0-inverted)."""
    c, h, w = shape
    g = _rng("l0_inv", seed)
    k = max(3, round(0.01 * h * w))
    idx = torch.randperm(h * w, generator=g)[:k]
    m = torch.zeros(h * w)
    m[idx] = 1
    m = m.view(1, h, w)
    p = (torch.rand(c, h, w, generator=g) > 0.5).float() * m
    return Trigger("l0_inv", "paste", p, m)


@ATTACKS.register("l2_inv")
def l2_inv(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A dense, small-norm perturbation over the whole image (RMS 0.05 per pixel; L2-inverted)."""
    g = _rng("l2_inv", seed)
    p = torch.randn(*shape, generator=g)
    p = p / p.pow(2).mean().sqrt() * 0.05
    return Trigger("l2_inv", "add", p, torch.ones(1, *shape[1:]))


@ATTACKS.register("smooth")
def smooth(shape: Sequence[int], seed: int = 0) -> Trigger:
    """A low-frequency perturbation (4x4 bicubic-upsampled, amplitude 0.2), then a per-image rescale."""
    p = 0.2 * _low_freq(_rng("smooth", seed), shape, 4)
    return Trigger("smooth", "add_rescale", p, torch.ones(1, *shape[1:]))


@ATTACKS.register("cl")
def cl(shape: Sequence[int], seed: int = 0) -> Trigger:
    """Clean-label (Turner et al. 2019): the checkerboard in all four corners; the poisoning also makes the
    target images hard to classify first (see ``abd_ray.attacks.poison``)."""
    p, m = _grid(shape, seed, corners=("tl", "tr", "bl", "br"))
    return Trigger("cl", "paste", p, m, clean_label=True, adversarial=True)


# --- a user's own pattern ---------------------------------------------------------------------------------------------


def _read_image(path: Path, what: str) -> torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist; give a PNG or NPY file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA") else "RGB"))
        else:
            raise ValueError(f"{what} file {path} has suffix {suffix!r}; allowed: .png, .npy")
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{what} file {path} cannot be read ({type(e).__name__}: {e}); give a PNG or NPY file") from e
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{what} file {path} has shape {arr.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    if arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # C, H, W -> H, W, C
    if suffix != ".npy" or arr.max() > 1.0:
        arr = arr / 255.0
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} file {path} holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _fit(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    c, h, w = shape
    if t.shape[1:] != (h, w):
        t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] != c:
        t = t.mean(0, keepdim=True).expand(c, h, w) if c == 1 or t.shape[0] == 1 else t[:c]
    if t.shape[0] == 1 and c > 1:
        t = t.expand(c, h, w)
    return t.contiguous().clamp(-1.0, 1.0)


def with_pattern_file(trigger: Trigger, pattern_file: str | None, mask_file: str | None) -> Trigger:
    """Replace a trigger's pattern (and mask) with a user's files, resized to the image.

    Without a mask file, the mask is the full image for blending triggers and the pattern's non-zero pixels for
    the others (the published trojan / BadNets pattern images are zero outside the trigger).
    """
    if pattern_file is None and mask_file is None:
        return trigger
    shape = trigger.pattern.shape
    pattern = trigger.pattern
    if pattern_file is not None:
        raw = _read_image(Path(pattern_file), "pattern")
        if raw.shape[0] == 4 and mask_file is None:  # an alpha channel is the mask
            mask_from_alpha = _fit(raw[3:4], (1, *shape[1:])) > 0.5
        else:
            mask_from_alpha = None
        pattern = _fit(raw, shape)
    if mask_file is not None:
        mask = (_fit(_read_image(Path(mask_file), "mask"), (1, *shape[1:])) > 0.5).float()
    elif pattern_file is not None and mask_from_alpha is not None:
        mask = mask_from_alpha.float()
    elif trigger.mode in ("blend", "add_rescale") or trigger.mask.all():
        mask = trigger.mask
    else:
        mask = (pattern.abs().sum(0, keepdim=True) > 0).float()
    if mask.sum() == 0:
        raise ValueError(f"the mask for {trigger.name} is empty (no pixel would change); check the mask/pattern file")
    return replace(trigger, pattern=pattern, mask=mask)
