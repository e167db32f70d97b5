"""Poisoned (or clean) teachers: train, write a self-describing artifact, cache by content, load safely.

An artifact is a folder with ``teacher.safetensors`` (weights) and ``teacher.json`` (the full spec, the training
budget, clean_acc / asr / robust_acc, the code version, and the SHA-256 of the weights file). The cache folder of a
spec is named by the hash of the spec, so one spec is trained once; a file lock makes two processes asking for the
same spec at the same time train it once. Weights are only ever read by safetensors or
``torch.load(weights_only=True)``: the premise of this project is an untrusted teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

import abd_ray
from abd_ray.attacks import make_trigger, poison_training_set, poisoned_test_set
from abd_ray.attacks.poison import pgd
from abd_ray.config import TeacherSpec
from abd_ray.data import DataBundle, load_dataset
from abd_ray.engine.repro import environment, environment_differences, fixed_float_order
from abd_ray.metrics import evaluate
from abd_ray.models import build_model
from abd_ray.registry import ATTACKS

# Bump when the training recipe changes, so cached teachers of the old recipe are not reused.
RECIPE_VERSION = 1
WEIGHTS = "teacher.safetensors"
META = "teacher.json"


class TeacherFileError(ValueError):
    """A teacher file that is missing, truncated, unsafe, or does not fit its architecture."""


@dataclass
class Teacher:
    """A loaded teacher and its metadata.

    Attributes:
        trained_elsewhere: for a cache hit, how the environment it was trained in differs from this one (torch
            version, device, threads, deterministic flag); empty when it matches or the teacher was trained here.
    """

    model: nn.Module
    meta: dict[str, Any]
    path: Path
    cached: bool
    trained_elsewhere: list[str] = field(default_factory=list)

    @property
    def spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.meta["spec"])

    @property
    def metrics(self) -> dict[str, float]:
        return self.meta["metrics"]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def teacher_key(spec: TeacherSpec) -> str:
    """Content address of a teacher spec."""
    blob = json.dumps(
        {"spec": {**spec.to_dict(), "attack": spec.attack.fingerprint()}, "recipe": RECIPE_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --- training --------------------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, g: torch.Generator, flip: bool, pad: int) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip) for a whole batch, without a per-sample loop."""
    n, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None].expand(n, h, w)
        cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :].expand(n, h, w)
        x = xp[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        f = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    augment: dict[str, Any] | None = None,
    desc: str = "teacher",
    progress: bool = True,
) -> nn.Module:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a per-step cosine schedule, the usual CIFAR recipe."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(x), generator=g).to(device)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = _augment(xb, g, **augment)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            total += len(idx)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}")
    model.eval()
    return model


def _augment_for(data: DataBundle) -> dict[str, Any] | None:
    if data.shape[1] < 16:
        return None  # 8x8 digits: a crop would cut the strokes, and the data set is easy
    return {"pad": 4, "flip": data.name in ("cifar10", "cifar100")}


def train_teacher(
    spec: TeacherSpec, data: DataBundle, device: torch.device, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher of ``spec`` on ``data``; returns the model and its metrics / poisoning record (with the
    environment it was trained in).

    The float order is fixed by the spec (:func:`~abd_ray.engine.repro.fixed_float_order`), so every entry point
    trains byte-identical weights for one spec on one machine and torch version.
    """
    spec.validate()
    with fixed_float_order(device, data.shape) as env:
        model, record = _train_teacher(spec, data, device, progress)
    record["environment"] = env
    return model, record


def _train_teacher(
    spec: TeacherSpec, data: DataBundle, device: torch.device, progress: bool
) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, num_classes=data.num_classes, shape=data.shape, mean=data.mean, std=data.std)
    x, y = data.x_train, data.y_train
    record: dict[str, Any] = {"poisoned": 0}
    trigger = None
    if spec.attack.active:
        trigger = make_trigger(spec.attack, data.shape)
        adversary = None
        if ATTACKS.meta(spec.attack.name).get("adversarial"):
            # Label-consistent attack: PGD on a clean model of the same recipe makes target images hard.
            torch.manual_seed(spec.seed + 1)
            clean = build_model(spec.arch, num_classes=data.num_classes, shape=data.shape, mean=data.mean, std=data.std)
            train_classifier(
                clean,
                x,
                y,
                spec.epochs,
                spec.batch_size,
                spec.lr,
                spec.seed + 1,
                device,
                _augment_for(data),
                desc="cl: clean model",
                progress=progress,
            )
            adversary = lambda xb, yb: pgd(clean, xb, yb, eps=16 / 255)  # noqa: E731
        x, y, idx = poison_training_set(x, y, trigger, spec.attack, adversary)
        record["poisoned"] = len(idx)
        torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    train_classifier(
        model,
        x,
        y,
        spec.epochs,
        spec.batch_size,
        spec.lr,
        spec.seed,
        device,
        _augment_for(data),
        desc=f"teacher {spec.arch}/{spec.attack.name}",
        progress=progress,
    )
    record["train_s"] = round(time.perf_counter() - t0, 2)
    record["metrics"] = teacher_metrics(model, data, spec, trigger)
    return model, record


def teacher_metrics(model: nn.Module, data: DataBundle, spec: TeacherSpec, trigger=None) -> dict[str, float]:
    if spec.attack.active:
        trigger = trigger or make_trigger(spec.attack, data.shape)
        xp, yp = poisoned_test_set(data.x_test, data.y_test, trigger, spec.attack.target)
        return evaluate(model, data.x_test, data.y_test, xp, yp, spec.attack.target)
    return evaluate(model, data.x_test, data.y_test, data.x_test[:0], data.y_test[:0], None)


# --- artifacts -------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(folder: Path, model: nn.Module, spec: TeacherSpec, record: dict[str, Any]) -> dict[str, Any]:
    """Write weights and metadata into ``folder`` atomically (a temp folder renamed into place)."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    meta = {
        "format": "abd-ray-teacher/1",
        "spec": spec.to_dict(),
        "key": teacher_key(spec),
        "num_classes": int(model.num_classes),
        "shape": list(load_shape(spec)),
        "budget": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr},
        "metrics": record["metrics"],
        "poisoned": record["poisoned"],
        "train_s": record.get("train_s"),
        "code_version": abd_ray.__version__,
        "recipe_version": RECIPE_VERSION,
        "weights_sha256": _sha256(tmp / WEIGHTS),
        "environment": record.get("environment"),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return meta


def load_shape(spec: TeacherSpec) -> tuple[int, int, int]:
    from abd_ray.data import dataset_info

    return dataset_info(spec.dataset).shape


def read_weights(path: Path, what: str = "teacher") -> dict[str, torch.Tensor]:
    """Read a weights file without running any code: safetensors, or torch.load(weights_only=True).

    Args:
        path: a ``.safetensors`` file, or a ``.pt`` / ``.pth`` state_dict (optionally under ``"state_dict"``).
        what: what the file is for (``teacher``, ``student``), named in the errors.

    Raises:
        TeacherFileError: missing, unreadable, truncated, holding pickled objects, or not a dict of tensors.
    """
    if not path.exists():
        raise TeacherFileError(f"{what} weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise TeacherFileError(
                f"refusing {what} file {path}: it holds pickled objects that would run code when loaded "
                "(only plain tensors are accepted; re-save it as a state_dict or as safetensors)"
            ) from None
        raise TeacherFileError(f"{what} file {path} is unreadable or truncated ({type(e).__name__}: {msg})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherFileError(f"{what} file {path} is not a state_dict of tensors")
    return state


def load_weights_into(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, fits: str
) -> nn.Module:
    """Load ``state`` strictly into ``model``; the input-normalisation buffers (``mean``, ``std``) take the file's
    shape and values whatever the model was built with.

    Args:
        what: what the file is for (``teacher``, ``student``); ``fits``: what it must fit, both named in errors.

    Raises:
        TeacherFileError: the tensors do not fit the model, or hold NaN/inf.
    """
    for name in ("mean", "std"):
        buf = model._buffers.get(name)
        if name in state and buf is not None and buf.shape != state[name].shape:
            model._buffers[name] = torch.empty(state[name].shape, dtype=buf.dtype, device=buf.device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(line.strip() for line in str(e).splitlines()[:3])
        raise TeacherFileError(f"{what} file {path} does not fit {fits}: {first}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TeacherFileError(f"{what} file {path} holds NaN/inf in {bad[:3]}")
    return model


def _load_into(spec: TeacherSpec, state: dict[str, torch.Tensor], num_classes: int, path: Path) -> nn.Module:
    from abd_ray.config import dataset_defaults  # noqa: F401  (validates the dataset name)
    from abd_ray.data import dataset_info

    info = dataset_info(spec.dataset)
    model = build_model(spec.arch, num_classes=num_classes, shape=info.shape, mean=(0.0,), std=(1.0,))
    fits = f"architecture {spec.arch!r} with {num_classes} classes"
    return load_weights_into(model, state, path, "teacher", fits).eval()


def load_artifact(folder: str | os.PathLike, verify: bool = True) -> Teacher:
    """Load a teacher artifact folder (or its ``teacher.json`` / weights file path)."""
    p = Path(folder)
    if p.is_file():
        p = p.parent
    meta_path, weights = p / META, p / WEIGHTS
    if not meta_path.exists():
        raise TeacherFileError(f"{p} is not a teacher artifact: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        spec = TeacherSpec.from_dict(meta["spec"])
    except Exception as e:
        raise TeacherFileError(f"teacher metadata {meta_path} is damaged ({type(e).__name__}: {e})") from None
    if verify and meta.get("weights_sha256") and weights.exists() and _sha256(weights) != meta["weights_sha256"]:
        raise TeacherFileError(f"teacher weights {weights} do not match their recorded SHA-256 (truncated or altered)")
    model = _load_into(spec, read_weights(weights), int(meta["num_classes"]), weights)
    return Teacher(model, meta, p, cached=True)


def load_external(path: str | os.PathLike, spec: TeacherSpec | None = None) -> Teacher:
    """Load a teacher someone else trained.

    ``path`` is an artifact folder, or a weights file (``.safetensors``, ``.pt``, ``.pth``) whose spec comes from
    a ``teacher.json`` beside it or from ``spec``. Pickled code is refused; tensors must fit the architecture.
    """
    p = Path(path)
    if not p.exists():
        raise TeacherFileError(f"teacher file {p} does not exist")
    if p.is_dir() or p.name == META:
        return load_artifact(p)
    side = p.parent / META
    meta: dict[str, Any]
    if side.exists():
        meta = json.loads(side.read_text())
        spec = TeacherSpec.from_dict(meta["spec"])
    elif spec is not None:
        meta = {"spec": spec.to_dict()}
    else:
        raise TeacherFileError(f"teacher file {p} has no {META} beside it; name its dataset and arch")
    state = read_weights(p)
    fc = [v for k, v in state.items() if k.endswith("fc.weight")]
    num_classes = int(meta.get("num_classes") or (fc[-1].shape[0] if fc else 0))
    model = _load_into(spec, state, num_classes, p)
    meta.setdefault("num_classes", num_classes)
    return Teacher(model, meta, p, cached=False)


# --- the cache -------------------------------------------------------------------------------------------------------


def cache_folder(spec: TeacherSpec, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser().resolve() / "teachers" / teacher_key(spec)


def get_teacher(
    spec: TeacherSpec,
    cache_dir: str | os.PathLike = ".abd_ray/cache",
    data_root: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Teacher:
    """The teacher of ``spec``: from the cache if a sound copy is there, else trained once and cached.

    A damaged cached copy (weights not matching their recorded hash) is reported, removed and retrained. A cache
    hit trained in another environment (:func:`~abd_ray.engine.repro.environment`) is used as it is, with a warning
    and its differences in :attr:`Teacher.trained_elsewhere`: its weights may differ from a teacher trained here.
    """
    spec.validate()
    folder = cache_folder(spec, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    with FileLock(str(folder) + ".lock"):
        if (folder / META).exists():
            try:
                t = load_artifact(folder)
                t.model.to(dev)
                t.trained_elsewhere = environment_differences(
                    t.meta.get("environment"), environment(dev, load_shape(spec))
                )
                if t.trained_elsewhere:
                    warnings.warn(
                        f"cached teacher {folder} was trained in another environment: "
                        f"{'; '.join(t.trained_elsewhere)}; it is used as it is, but a teacher trained here may "
                        "differ in its last bits (delete the folder to retrain it here)",
                        stacklevel=2,
                    )
                return t
            except TeacherFileError as e:
                warnings.warn(f"cached teacher is damaged, retraining it: {e}", stacklevel=2)
                shutil.rmtree(folder, ignore_errors=True)
        data = load_dataset(spec.dataset, data_root)
        model, record = train_teacher(spec, data, dev, progress)
        meta = write_artifact(folder, model, spec, record)
    return Teacher(model, meta, folder, cached=False)
