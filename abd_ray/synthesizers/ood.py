"""Distillation on out-of-distribution images: patches of one natural image (Asano & Saeed, "Extrapolating from
a Single Image to a Thousand Classes using Distillation", ICLR 2023 / arXiv:2112.00725), as the ABD paper's
``ood`` baseline used it.

Each batch is cut from the source image(s): random resized crops of a random area and aspect ratio, random flips
and brightness / contrast jitter, then CutMix (Yun et al. 2019; Beta(0.25, 0.25), applied with probability 1)
between the crops; the student distils the teacher's outputs on them at temperature 8 (ALGORITHMS.md section
3). The default source is the ``china.jpg`` picture that scikit-learn ships; ``synth.image`` names another
image file or a folder of images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abd_ray.data.augment import random_resized_crop, shift_flip
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers.base import Batch, SynthContext, Synthesizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    return [path]


def check_image_source(image: str | None) -> None:
    """Raise a ValueError unless ``image`` is None (the default picture), an image file, or a folder of images."""
    if image is None:
        return
    p = Path(str(image)).expanduser()
    if not p.exists():
        raise ValueError(
            f"synthesizer 'ood': synth.image={image!r} does not exist; give an image file or a folder of images "
            "(or leave it unset for scikit-learn's china.jpg)"
        )
    if p.is_dir() and not _image_files(p):
        raise ValueError(f"synthesizer 'ood': folder {str(p)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")


def load_sources(image: str | None, channels: int, folder_size: int, max_images: int) -> torch.Tensor:
    """The source picture(s) as a (B, C, H, W) float tensor in [0, 1].

    A single image keeps its size; the images of a folder are resized to ``folder_size`` squared so they stack.
    """
    from PIL import Image

    if image is None:
        from sklearn.datasets import load_sample_image

        arrays = [load_sample_image("china.jpg")]
    else:
        files = _image_files(Path(str(image)).expanduser())[:max_images]
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if len(files) > 1:
                        im = im.resize((folder_size, folder_size), Image.BILINEAR)
                    arrays.append(np.asarray(im))
            except OSError as e:
                raise ValueError(f"synthesizer 'ood': cannot read image {str(f)!r} ({e})") from None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # ITU-R 601 luma
    elif channels != 3:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x.contiguous()


def sample_beta(a: float, gen: torch.Generator) -> float:
    """One Beta(a, a) draw from ``gen`` (Johnk's method: torch's Beta sampler takes no generator)."""
    while True:
        u = torch.rand(64, 2, generator=gen, device=gen.device).double().cpu()
        xx, yy = u[:, 0].pow(1.0 / a), u[:, 1].pow(1.0 / a)
        ok = (xx + yy) <= 1.0
        ok &= (xx + yy) > 0
        if ok.any():
            i = int(ok.nonzero()[0])
            return float(xx[i] / (xx[i] + yy[i]))


def cutmix(x: torch.Tensor, gen: torch.Generator, beta: float, prob: float) -> torch.Tensor:
    """CutMix within a batch: one box of area ``1 - lam`` (lam ~ Beta(beta, beta)) pasted from a shuffled copy."""
    n, _, h, w = x.shape
    if prob <= 0 or float(torch.rand(1, generator=gen, device=gen.device)) >= prob:
        return x
    lam = sample_beta(beta, gen)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    c = torch.rand(2, generator=gen, device=gen.device)
    cy, cx = int(c[0] * h), int(c[1] * w)
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return out


@SYNTHESIZERS.register("ood")
class OOD(Synthesizer):
    """KD on augmented patches of one natural image (or a folder of images), with CutMix."""

    paper = "Asano & Saeed, Extrapolating from a Single Image to a Thousand Classes using Distillation, ICLR 2023"
    fixed_data = True
    defaults = {
        "image": None,  # None: scikit-learn's china.jpg (one natural image, as the single-image paper)
        "scale_min": 0.002,  # ours: smallest crop, as a fraction of the source's area
        "scale_max": 0.1,  # ours: largest crop
        "jitter": 0.4,  # ours: brightness / contrast jitter strength (Asano & Saeed augment colour heavily)
        "cutmix_beta": 0.25,  # ABD paper's ood runs: CutMix Beta(0.25, 0.25)
        "cutmix_prob": 1.0,  # ABD paper's ood runs: CutMix on every batch
        "folder_size": 256,  # ours: folder images are resized to this square so that they stack
        "max_images": 512,  # ours: at most this many folder images are held in memory
        "T": 8.0,  # ABD paper's ood runs: temperature 8
        "lr_s": 2e-3,  # the ZSKT student recipe (Adam 2e-3, clip 5), so ood is comparable with zskt
        "opt_s": "adam",
        "wd_s": 0.0,
        "clip": 5.0,
    }
    positive = Synthesizer.positive | {"scale_min", "scale_max", "folder_size", "max_images", "cutmix_beta"}
    nullable = Synthesizer.nullable | {"image"}

    @classmethod
    def check_params(cls, p: dict[str, Any]) -> None:
        if p["image"] is not None and not isinstance(p["image"], str):
            raise ValueError(f"synthesizer 'ood': synth.image={p['image']!r} must be a path")
        check_image_source(p["image"])
        if not p["scale_min"] <= p["scale_max"] <= 1:
            raise ValueError("synthesizer 'ood': need 0 < synth.scale_min <= synth.scale_max <= 1")
        if not p["cutmix_prob"] <= 1:
            raise ValueError(f"synthesizer 'ood': synth.cutmix_prob={p['cutmix_prob']!r} must be in [0, 1]")

    def __init__(self, ctx: SynthContext, params: dict[str, Any] | None = None) -> None:
        super().__init__(ctx, params)
        p = self.params
        self.src = load_sources(p["image"], ctx.shape[0], p["folder_size"], p["max_images"]).to(ctx.device)

    def make_batch(self) -> torch.Tensor:
        """One batch of augmented, CutMixed patches in [0, 1]."""
        ctx, p = self.ctx, self.params
        n = ctx.batch_size
        g = ctx.gen
        idx = torch.randint(0, len(self.src), (n,), generator=g, device=ctx.device)
        x = random_resized_crop(self.src, n, ctx.shape[1:], g, (p["scale_min"], p["scale_max"]), src_index=idx)
        x = shift_flip(x, g, pad=0, flip=True)
        j = p["jitter"]
        if j > 0:
            f = 1.0 + j * (2 * torch.rand(n, 2, 1, 1, 1, generator=g, device=ctx.device) - 1)
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - m) * f[:, 1] + m) * f[:, 0]  # contrast about the patch mean, then brightness
        x = x.clamp(0, 1)
        return cutmix(x, g, p["cutmix_beta"], p["cutmix_prob"])

    def batches(self, step: int) -> Iterator[Batch]:
        x = self.make_batch()
        yield self.fixed_batch(x)
