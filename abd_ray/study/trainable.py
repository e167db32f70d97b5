"""The Tune trainable: one distillation run per trial, built on :func:`abd_ray.engine.distill.distill`.

The trainable gets one plain flat dict (what Tune passes and MLflow logs as params) and turns it into a
:class:`~abd_ray.config.RunConfig` once, at its top. The engine's ``report`` callback becomes ``tune.report``
with a checkpoint of the loop's whole state at every evaluation, so a trial whose worker or node dies restarts
from its last evaluation (``FailureConfig(max_failures)``). The last report carries ``final: 1`` and a
checkpoint with the trial's artifacts (sample grid, trigger, student weights), which the driver logs to MLflow.

Only ``ray.tune.report`` / ``get_checkpoint`` / ``Checkpoint`` are used here: ``ray.train.*`` inside a Tune
function fails the trial in recent Ray releases.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from ray import tune

STATE_FILE = "state.pt"
FINAL_FILE = "final.json"
ARTIFACTS = "artifacts"
PROGRESS_FILE = "progress.json"


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial's flat dict into the run config keys and the study's own ``study.*`` metadata."""
    run = {k: v for k, v in config.items() if not k.startswith("study.")}
    meta = {k: v for k, v in config.items() if k.startswith("study.")}
    return run, meta


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (a plain call in a test) there is no node
        return "local"


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_png(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Write a batch (N, C, H, W) in [0, 1] as one PNG grid; small images are enlarged (nearest) to be seen."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.detach().float().cpu().clamp(0, 1)
    if x.dim() == 3:
        x = x[None]
    scale = max(1, math.ceil(32 / x.shape[-1]))
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=min(nrow, len(x)), padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    Image.fromarray(arr).save(path)


def write_artifacts(folder: Path, cfg, result) -> None:
    """The trial's artifacts: samples.png, trigger.png and student.safetensors."""
    from safetensors.torch import save_file

    from abd_ray.attacks import make_trigger
    from abd_ray.data import dataset_info

    folder.mkdir(parents=True, exist_ok=True)
    if result.samples is not None and len(result.samples):
        save_png(result.samples, folder / "samples.png")
    if cfg.attack.active:
        trig = make_trigger(cfg.attack, dataset_info(cfg.dataset).shape)
        save_png(torch.stack([trig.preview(), trig.pattern.clamp(0, 1), trig.mask.expand_as(trig.pattern)]),
                 folder / "trigger.png", nrow=3)
    if result.student is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in result.student.state_dict().items()}
        save_file(state, str(folder / "student.safetensors"))


def _read_checkpoint(ckpt: tune.Checkpoint) -> tuple[dict | None, dict | None, str | None]:
    """(loop state, final record, local copy of a final checkpoint) of a checkpoint; a damaged one yields Nones."""
    from abd_ray.engine.distill import load_state

    with ckpt.as_directory() as d:
        d = Path(d)
        if (d / FINAL_FILE).exists():
            keep = tempfile.mkdtemp(prefix="abd-final-")
            shutil.copytree(d, keep, dirs_exist_ok=True)
            return None, json.loads((d / FINAL_FILE).read_text()), keep
        try:
            return load_state(d / STATE_FILE), None, None
        except Exception as e:  # noqa: BLE001 - a truncated file must not end the trial: start over instead
            warnings.warn(f"trial checkpoint {d} is unreadable ({type(e).__name__}: {e}); starting the run over",
                          stacklevel=2)
            return None, None, None


def train_trial(config: dict[str, Any]) -> None:
    """Run one trial: distil with reports and checkpoints at every evaluation, then a final report."""
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill, save_state
    from abd_ray.engine.teacher import load_artifact

    run_flat, _ = split_config(config)
    cfg = RunConfig.from_flat(run_flat)
    node = _node_id()

    resume_state, final, final_dir = None, None, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        resume_state, final, final_dir = _read_checkpoint(ckpt)
    if final is not None:
        # The run had finished before its driver or node went away: report the same final result again.
        tune.report({**final, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(final_dir))
        shutil.rmtree(final_dir, ignore_errors=True)
        return
    resumed_from = int(resume_state["step"]) if resume_state is not None else 0

    teacher = load_artifact(cfg.teacher_file) if cfg.teacher_file else None

    def report(metrics: dict[str, float], step: int, get_state) -> None:
        with tempfile.TemporaryDirectory(prefix="abd-ckpt-") as d:
            save_state(get_state(), Path(d) / STATE_FILE)
            (Path(d) / PROGRESS_FILE).write_text(json.dumps({"step": step}))
            tune.report({**_clean(metrics), "step": step, "resumed_from": resumed_from, "node_id": node},
                        checkpoint=tune.Checkpoint.from_directory(d))

    result = distill(cfg, teacher=teacher, report=report, resume_state=resume_state, progress=False)
    steps = int(cfg.resolved().steps)
    final = {**_clean(result.metrics), "step": steps, "final": 1, "resumed_from": resumed_from}
    with tempfile.TemporaryDirectory(prefix="abd-final-") as d:
        write_artifacts(Path(d) / ARTIFACTS, cfg.resolved(), result)
        (Path(d) / FINAL_FILE).write_text(json.dumps(final))
        tune.report({**final, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(d))


def trial_dirname(trial) -> str:
    """A short trial folder name (Tune's default spells out the whole config and hits path-length limits)."""
    return f"trial_{trial.trial_id}"
