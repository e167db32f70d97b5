"""GPU figures (``bench/run.py gpu``; ``bench/gpu.sh`` runs it within 8 minutes on one H100/H200).

1. KD step throughput, WRN-16-2 -> WRN-16-1, 32x32x3, batch 256, ZSKT at the paper's config (1 generator + 10
   student steps per pseudo batch, the engine's student step): fp32 (contiguous), bf16 autocast + channels_last
   (what ``distill()`` does on CUDA), and the same with ``torch.compile`` on teacher, student and generator.
2. GPU sharing: ``k`` quickstart-size trials (digits, zskt, the real ``distill()`` in ``k`` processes at once, each
   one ``1/k`` of the GPU as Ray's fractional ``gpu`` resource would give it) for k = 1, 2, 4, 8, 16: per-trial
   steps/s, and the largest k before it falls below half of k = 1.
``--cpu``: the same code on the CPU at toy sizes (a smoke check of the script where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def kd_throughput(variant: str, batch: int, iters: int, device: str) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import zskt_step as zs

    from abd_ray.defenses import Defense
    from abd_ray.synthesizers import SynthContext, synthesizer_class

    dev = torch.device(device)
    amp = variant != "fp32" and dev.type == "cuda"
    data, T, S = zs.models(batch, dev, channels_last=variant != "fp32")
    ctx = SynthContext(T, S, data, dev, 80000, batch, Defense(), torch.Generator(device=dev).manual_seed(1),
                       torch.Generator().manual_seed(2), amp)
    synth = synthesizer_class("zskt")(ctx, {})
    opt = synth.student_optimizer(S.parameters())
    if variant == "amp_cl_compile":
        ctx.teacher = torch.compile(T)
        ctx.student = torch.compile(S)
        synth.generator = torch.compile(synth.generator)
        S_run = ctx.student
    else:
        S_run = S

    def pseudo_batch(step: int) -> None:
        for b in synth.batches(step):
            opt.zero_grad(set_to_none=True)
            with ctx.autocast():
                out = S_run(b.x, return_features=synth.needs_features)
            s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
            synth.student_loss(s_logits.float(), s_feats, b).mean().backward()
            torch.nn.utils.clip_grad_norm_(S.parameters(), 5.0)
            opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for i in range(3):  # warm-up (and compilation)
        pseudo_batch(i)
    sync()
    warm = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(iters):
        pseudo_batch(3 + i)
    sync()
    dt = (time.perf_counter() - t0) / iters
    return {"variant": variant, "batch": batch, "iters": iters, "s_per_pseudo_batch": dt,
            "pseudo_batches_per_s": 1 / dt, "student_steps_per_s": 10 / dt, "warmup_s": warm,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def sharing(ks: list[int], steps: int, device: str, cache: str) -> list[dict[str, Any]]:
    run_py = str(Path(__file__).with_name("run.py"))
    out = []
    base = None
    for k in ks:
        # The k processes import torch and start CUDA at their own pace; the barrier starts their loops together,
        # so the timed windows overlap and measure k trials sharing the device.
        barrier = tempfile.mkdtemp(prefix=f"abd-gpu-share-{k}-")
        cmd = [sys.executable, run_py, "_cell", "--synth", "zskt", "--defense", "none", "--dataset", "digits",
               "--steps", str(steps), "--eval-every", str(max(1, steps // 2)), "--device", device, "--cache", cache,
               "--barrier", f"{barrier}:{k}"]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(k)]
        rates = []
        for p in procs:
            o, _ = p.communicate()
            lines = [ln for ln in o.splitlines() if ln.startswith("CELL ")]
            if lines:
                rates.append(1.0 / json.loads(lines[-1][5:])["loop_wall_s_per_step"])
        shutil.rmtree(barrier, ignore_errors=True)
        row = {"k": k, "per_trial_steps_per_s": min(rates) if rates else None,
               "mean_per_trial_steps_per_s": sum(rates) / len(rates) if rates else None,
               "total_steps_per_s": sum(rates) if rates else None, "finished": len(rates),
               "wall_s": time.perf_counter() - t0}
        if base is None and rates:
            base = row["mean_per_trial_steps_per_s"]
        row["per_trial_vs_k1"] = row["mean_per_trial_steps_per_s"] / base if base and rates else None
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def gpu_main(args: argparse.Namespace, argv: list[str]) -> None:
    import run as R
    import torch

    cpu = args.cpu or args.smoke
    device = "cpu" if cpu else "cuda"
    if cpu:
        torch.set_num_threads(1)  # two shared cores: spinning OpenMP workers make toy sizes 10x slower
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the smoke check")
    batch, iters = (8, 2) if cpu else (256, args.iters)
    variants = ["fp32", "amp_cl"] + ([] if args.no_compile or cpu else ["amp_cl_compile"])
    kd = []
    for v in variants:
        try:
            kd.append(kd_throughput(v, batch, iters, device))
        except Exception as e:  # noqa: BLE001 - a failing compile must not lose the other figures
            kd.append({"variant": v, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(kd[-1]), flush=True)
    ks = [1, 2] if cpu else [int(k) for k in args.ks.split(",")]
    share = sharing(ks, 6 if cpu else args.share_steps, device, args.cache)
    doc = {"machine": R.machine(), "command": " ".join(["bench/gpu.sh", *argv[1:]]) if not cpu else R.cmdline(argv),
           "device": device, "kd": kd, "sharing": share}
    fp = next((r for r in kd if r["variant"] == "fp32" and "error" not in r), None)
    for r in kd:
        if fp and "error" not in r:
            r["speedup_vs_fp32"] = fp["s_per_pseudo_batch"] / r["s_per_pseudo_batch"]
    half = [r["k"] for r in share if r.get("per_trial_vs_k1") is not None and r["per_trial_vs_k1"] >= 0.5]
    doc["max_k_at_half_throughput"] = max(half) if half else None
    out = Path(args.out) if args.out else R.RESULTS / ("gpu_cpu_smoke.json" if cpu else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [f"## GPU ({doc['machine'].get('gpu') or device})", "", f"Command: `{doc['command']}`  ",
             f"Machine: {R.machine_line(doc['machine'])}", "",
             f"| KD step, WRN-16-2 -> WRN-16-1, 32x32x3, batch {batch} | s / pseudo batch | student steps/s | "
             "speedup | peak MiB |", "|---|---|---|---|---|"]
    for r in kd:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['s_per_pseudo_batch']:.4f} | {r['student_steps_per_s']:.1f} | "
                         f"{r.get('speedup_vs_fp32', float('nan')):.2f}x | {r['peak_mib'] or '-'} |")
    lines += ["", "| trials sharing the device (digits zskt, quickstart size) | per-trial steps/s | vs k=1 | "
              "total steps/s |", "|---|---|---|---|"]
    def f(v: Any, nd: int = 1) -> str:
        return f"{v:.{nd}f}" if isinstance(v, float) else "-"

    for r in share:
        lines.append(f"| {r['k']} | {f(r['mean_per_trial_steps_per_s'])} | {f(r['per_trial_vs_k1'], 2)} | "
                     f"{f(r['total_steps_per_s'])} |")
    lines += ["", f"Largest k with per-trial throughput >= half of k=1: {doc['max_k_at_half_throughput']}", ""]
    md = "\n".join(lines)
    (out.with_suffix(".md")).write_text(md)
    print(f"wrote {out}")
    print(md)  # the short table, last


def register(sub) -> dict[str, Any]:
    p = sub.add_parser("gpu", help="GPU figures: KD step fp32 vs AMP+channels_last(+compile); trials per GPU")
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: a smoke check without a GPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--share-steps", type=int, default=400)
    p.add_argument("--out", default=None)
    return {"gpu": gpu_main}
