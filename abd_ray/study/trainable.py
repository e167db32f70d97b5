"""The Tune trainable: one distillation run per trial, built on :func:`abd_ray.engine.distill.distill`.

The trainable gets one plain flat dict (what Tune passes and MLflow logs as params) and turns it into a
:class:`~abd_ray.config.RunConfig` once, at its top. The engine's ``report`` callback becomes ``tune.report``
with a checkpoint of the loop's whole state at every evaluation, so a trial whose worker or node dies restarts
from its last evaluation (``FailureConfig(max_failures)``). The last report carries ``final: 1`` and a
checkpoint with the trial's artifacts (sample grid, trigger, student weights), which the driver logs to MLflow.

Only ``ray.tune.report`` / ``get_checkpoint`` / ``Checkpoint`` are used here: ``ray.train.*`` inside a Tune
function fails the trial in recent Ray releases.

Guards and fault injection (study layer only; the engine knows nothing of them):

- a trial the searcher marked as reused (``study.reused_result``, a finished twin's final record) reports that
  record as its own and runs nothing;
- a trial whose losses become non-finite is failed with a :class:`FloatingPointError` naming the loss and the step,
  before that evaluation is checkpointed (so a retry resumes from the last sound state);
- a damaged checkpoint (truncated ``state.pt``) is not fatal: the trial falls back to the newest older checkpoint of
  the same trial that still reads, or starts over, with a warning;
- ``fault.*`` keys of the flat config (from a study file's ``faults:`` rules, see docs/errors.md) make a chosen trial
  fail on purpose, to exercise the retry, failure and reporting paths on the real stack:
  ``fault.raise_at_step: N`` raises at the first evaluation at or after step N; ``fault.nan_at_step: N`` makes the
  teacher's logits NaN from the evaluation at step N on (a broken teacher), so the losses really go NaN and the
  guard above fails the trial; ``fault.pause_per_eval_s: N`` sleeps N seconds after each evaluation (a slow trial).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from ray import tune

from abd_ray.study.cluster import VERBOSE_ENV
from abd_ray.study.spec import split_config

STATE_FILE = "state.pt"
FINAL_FILE = "final.json"
ARTIFACTS = "artifacts"


class InjectedFault(RuntimeError):
    """The failure a ``fault.raise_at_step`` key asks for."""


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Raise a FloatingPointError if a loss of an evaluation is NaN or infinite (the run has diverged)."""
    bad = {k: v for k, v in metrics.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)}
    if bad:
        k, v = sorted(bad.items())[0]
        raise FloatingPointError(f"non-finite loss {k}={v} at step {step}: the run diverged (or its teacher emits "
                                 "NaN); lower the learning rates or check the teacher file")


def _nan_logits_hook(armed: dict[str, bool]):
    """A teacher forward hook that turns its logits into NaN once ``armed['on']`` is set (fault.nan_at_step)."""

    def hook(module, inputs, output):
        if not armed["on"]:
            return None
        if isinstance(output, tuple):
            return (torch.full_like(output[0], float("nan")), *output[1:])
        return torch.full_like(output, float("nan"))

    return hook


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


def _older_checkpoints(ckpt: tune.Checkpoint) -> list[Path]:
    """The trial's other checkpoint folders older than ``ckpt``, newest first (local storage only)."""
    try:
        import pyarrow.fs

        if not isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
            return []
    except Exception:  # noqa: BLE001 - no way to list a remote store here: the caller starts over instead
        return []
    here = Path(ckpt.path)
    return sorted((p for p in here.parent.glob("checkpoint_*") if p.is_dir() and p.name < here.name), reverse=True)


def _read_checkpoint(ckpt: tune.Checkpoint) -> tuple[dict | None, dict | None, str | None]:
    """(loop state, final record, local copy of a final checkpoint) of a checkpoint.

    A damaged checkpoint (a truncated or altered ``state.pt``) falls back, with a warning, to the newest older
    checkpoint of the trial that reads; if none does, the run starts over (all Nones).
    """
    from abd_ray.engine.distill import load_state

    with ckpt.as_directory() as d:
        d = Path(d)
        if (d / FINAL_FILE).exists():
            keep = tempfile.mkdtemp(prefix="abd-final-")
            shutil.copytree(d, keep, dirs_exist_ok=True)
            return None, json.loads((d / FINAL_FILE).read_text()), keep
        try:
            return load_state(d / STATE_FILE), None, None
        except Exception as e:  # noqa: BLE001 - a truncated file must not end the trial
            first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for older in _older_checkpoints(ckpt):
        try:
            state = load_state(older / STATE_FILE)
        except Exception:  # noqa: BLE001 - damaged too: try the next older one
            continue
        warnings.warn(f"trial checkpoint {ckpt.path} is unreadable ({first}); falling back to the older checkpoint "
                      f"{older} (step {state.get('step')})", stacklevel=2)
        return state, None, None
    warnings.warn(f"trial checkpoint {ckpt.path} is unreadable ({first}) and no older one reads; starting the run "
                  "over", stacklevel=2)
    return None, None, None


def train_trial(config: dict[str, Any]) -> None:
    """Run one trial: distil with reports and checkpoints at every evaluation, then a final report."""
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill, save_state
    from abd_ray.engine.teacher import load_external

    quiet_ray_logs()
    run_flat, meta = split_config(config)
    if meta.get("study.reused_result"):
        # A deterministic twin of a finished trial (the searcher found it): its result, with no compute.
        record = json.loads(meta["study.reused_result"])
        if "wall_s" in record:
            record["wall_s"] = 0.0
        tune.report({**record, "reused": 1, "node_id": _node_id()})
        return
    cfg = RunConfig.from_flat(run_flat).resolved()  # the dataset's defaults filled in, once
    raise_at = meta.get("fault.raise_at_step")
    nan_at = meta.get("fault.nan_at_step")
    pause_s = int(meta.get("fault.pause_per_eval_s") or 0)
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

    # load_external reads a cache artifact (checking its recorded hash) or a user's file, weights-only either way.
    teacher = load_external(cfg.teacher_file, cfg.teacher_spec()) if cfg.teacher_file else None
    armed = {"on": nan_at is not None and resumed_from >= int(nan_at)}
    if nan_at is not None and teacher is not None:
        teacher.model.register_forward_hook(_nan_logits_hook(armed))

    def report(metrics: dict[str, float], step: int, get_state) -> None:
        # Checked before the checkpoint is written, so a retry starts from the last sound evaluation.
        check_finite(metrics, step)
        if raise_at is not None and step >= int(raise_at):
            raise InjectedFault(f"fault injection: fault.raise_at_step={raise_at} reached at step {step}")
        with tempfile.TemporaryDirectory(prefix="abd-ckpt-") as d:
            save_state(get_state(), Path(d) / STATE_FILE)
            tune.report({**_clean(metrics), "step": step, "resumed_from": resumed_from, "node_id": node},
                        checkpoint=tune.Checkpoint.from_directory(d))
        if nan_at is not None and step >= int(nan_at):
            armed["on"] = True
        time.sleep(pause_s)

    result = distill(cfg, teacher=teacher, report=report, resume_state=resume_state, progress=False)
    steps = int(cfg.steps)
    check_finite(result.metrics, steps)
    final = {**_clean(result.metrics), "step": steps, "final": 1, "resumed_from": resumed_from}
    with tempfile.TemporaryDirectory(prefix="abd-final-") as d:
        write_artifacts(Path(d) / ARTIFACTS, cfg, result)
        (Path(d) / FINAL_FILE).write_text(json.dumps(final))
        tune.report({**final, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(d))


def trial_label(config: dict[str, Any], trial_id: str) -> str:
    """``<attack>/<synthesizer>/<defense>/s<seed>/<trial id>``: what a trial is, in Tune's table and in MLflow."""
    parts = (config.get("attack.name"), config.get("synthesizer"), config.get("defense"), f"s{config.get('seed')}")
    return "/".join([*(str(p) for p in parts), trial_id])


def trial_name(trial) -> str:
    """The trial's name in Tune's progress table (the same as its MLflow child run's)."""
    return trial_label(trial.config, trial.trial_id)


def trial_dirname(trial) -> str:
    """The trial's folder: its label with ``-`` between the parts (a folder name cannot hold ``/``), e.g.
    ``badnet_grid-zskt-abd-s0-40af3034``. Short, unlike Tune's default, which spells out the whole config."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", p) for p in trial_name(trial).split("/"))


def quiet_ray_logs() -> None:
    """Keep Ray's per-checkpoint INFO lines ("Checkpoint successfully created at ...") out of the driver's console
    unless the study runs with ``-v`` (``$ABD_RAY_VERBOSE``, which a local Ray's workers inherit)."""
    if os.environ.get(VERBOSE_ENV, "0") != "1":
        logging.getLogger("ray.train").setLevel(logging.WARNING)
