"""Float order fixed by the spec: one place that sets every torch setting which changes the order of float
operations, for teacher training and for distillation alike.

The same spec must give the same weights whichever entry point runs it (``abd-ray teacher``, ``abd-ray distill``,
a study's teacher task or trial under Ray, a benchmark). Torch's intra-op thread count changes how reductions are
split, so it is decided here from the input shape, never from the machine or ``OMP_NUM_THREADS``. On CUDA, where
kernels are picked at run time and atomics reorder sums, torch's deterministic algorithms are switched on
(warn-only: an op without a deterministic kernel still runs) and cuDNN is held to deterministic, non-benchmarked
kernels. On the CPU it stays off: torch's CPU kernels at a fixed thread count repeat run to run, and the mode
swaps some of them for others (per torch's documentation, an accumulating ``index_put_``), which would risk moving
the figures that earlier CPU runs were made with.

The float order is fixed on one kind of chip only: another CPU model (or GPU) picks other kernels, so the same
spec trains to other last bits, and from there to other figures. The chip is part of :func:`environment`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Convolutions on 8x8 inputs do not parallelise, and OpenMP workers spin-wait on a shared machine: small inputs
# run single-threaded (the measurement is in docs/defaults.md).
SMALL_INPUT = 1024
# Larger inputs (32x32x3): a fixed count, so a teacher does not change with the machine's core count; two is what
# this project's CPU figures were taken with, and a GPU run does its float work on the device anyway.
LARGE_INPUT_THREADS = 2


def cpu_threads(shape: tuple[int, ...]) -> int:
    """Torch's intra-op thread count for inputs of ``shape`` (C, H, W): a function of the spec alone."""
    n = 1
    for s in shape:
        n *= int(s)
    return 1 if n <= SMALL_INPUT else LARGE_INPUT_THREADS


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def processor(device: torch.device) -> str:
    """The chip that does a run's float work on ``device``: the GPU's name on CUDA, else the CPU's model and the
    instruction set torch's kernels dispatch to (one model name covers CPUs with and without AVX-512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels"


def environment(device: torch.device, shape: tuple[int, ...]) -> dict[str, Any]:
    """What a result trained under :func:`fixed_float_order` depends on beyond its spec (``deterministic``:
    whether torch's deterministic algorithms are on; ``processor``: the chip, whose kernels order the floats)."""
    return {
        "torch": torch.__version__,
        "device": device.type,
        "processor": processor(device),
        "threads": cpu_threads(shape),
        "deterministic": device.type == "cuda",
    }


def environment_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The settings in which ``recorded`` (an artifact's environment) differs from ``current``, one phrase each;
    empty when they agree."""
    if not recorded:
        return ["its training environment is not recorded (made before environments were recorded)"]
    return [f"{k} {recorded.get(k)!r} (here {v!r})" for k, v in current.items() if recorded.get(k) != v]


@contextmanager
def fixed_float_order(device: torch.device, shape: tuple[int, ...]) -> Iterator[dict[str, Any]]:
    """Run the block with the thread count and deterministic settings of :func:`environment`; restore torch's
    previous settings afterwards. Yields that environment."""
    env = environment(device, shape)
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.set_num_threads(env["threads"])
    if env["deterministic"]:
        # cuBLAS reads this once, when its handle is made; a process that already used cuBLAS keeps its setting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield env
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[3], before[4]
