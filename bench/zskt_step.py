"""Time one ZSKT pseudo batch at the paper's config: the seed's loop structure against ours.

Paper config (ALGORITHMS.md section 3): WRN-16-2 teacher -> WRN-16-1 student, batch 128, 32x32x3, z_dim 100,
1 generator step + 10 student steps (KD + 250 x attention transfer), Adam, gradient clipping at 5.

- ``seed``: the structure we replaced -- each of the 11 iterations re-runs the generator and the teacher, and each
  student backward flows on through the teacher into the generator.
- ``ours``: :class:`abd_ray.synthesizers.zskt.ZSKT` + the student step of :mod:`abd_ray.engine.distill` -- one
  generator pass and one teacher pass per pseudo batch, detached inputs for the student steps, no student
  weight gradients in the generator step.

Weights are random (speed does not depend on them); the data bundle is random 32x32x3 tensors.

    .venv/bin/python bench/zskt_step.py --reps 3            # writes bench/results/zskt_step.json
    .venv/bin/python bench/zskt_step.py --smoke-test         # batch 8, 1 rep: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from abd_ray.data import DataBundle
from abd_ray.defenses import Defense
from abd_ray.losses import attention_transfer, kd_divergence
from abd_ray.models import build_model
from abd_ray.synthesizers import SynthContext, synthesizer_class

OUT = Path(__file__).resolve().parent / "results" / "zskt_step.json"


def models(batch: int, device: torch.device, channels_last: bool):
    data = DataBundle(
        "cifar10",
        torch.rand(batch, 3, 32, 32),
        torch.zeros(batch, dtype=torch.long),
        torch.rand(8, 3, 32, 32),
        torch.zeros(8, dtype=torch.long),
        10,
        (0.5,) * 3,
        (0.25,) * 3,
    )
    torch.manual_seed(0)
    t = build_model("wrn16_2", num_classes=10, shape=data.shape, mean=data.mean, std=data.std).to(device).eval()
    s = build_model("wrn16_1", num_classes=10, shape=data.shape, mean=data.mean, std=data.std).to(device).train()
    for p in t.parameters():
        p.requires_grad_(False)
    if channels_last:
        t, s = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return data, t, s


def seed_pseudo_batch(G, T, S, opt_g, opt_s, batch, n_s, beta, gen) -> None:
    z = torch.randn(batch, 100, generator=gen)
    x = G(z)
    loss_g = -kd_divergence(S(x), T(x))
    opt_g.zero_grad()
    loss_g.backward()
    nn.utils.clip_grad_norm_(G.parameters(), 5)
    opt_g.step()
    for _ in range(n_s):
        x = G(z)
        t_logits, t_feats = T(x, return_features=True)
        s_logits, s_feats = S(x, return_features=True)
        loss = kd_divergence(s_logits, t_logits) + beta * attention_transfer(s_feats[:-1], t_feats[:-1])
        opt_s.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(S.parameters(), 5)
        opt_s.step()


def our_pseudo_batch(synth, S, opt_s, step) -> None:
    # The student step of abd_ray.engine.distill, without the (no-op) defense calls.
    for batch in synth.batches(step):
        opt_s.zero_grad(set_to_none=True)
        s_logits, s_feats = S(batch.x, return_features=synth.needs_features)
        per = synth.student_loss(s_logits, s_feats, batch)
        per.mean().backward()
        nn.utils.clip_grad_norm_(S.parameters(), 5)
        opt_s.step()


def time_it(fn, reps: int) -> list[float]:
    fn(0)  # warm-up (allocator, kernels)
    out = []
    for r in range(reps):
        t = time.perf_counter()
        fn(r + 1)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-s", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true", help="also time ours with channels_last models")
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.smoke_test:
        args.batch, args.reps, args.n_s = 8, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results: dict[str, object] = {
        "batch": args.batch,
        "n_s": args.n_s,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }

    data, T, S = models(args.batch, device, False)
    G = build_model("generator", shape=data.shape, z_dim=100, ngf=64, mean=data.mean, std=data.std).train()
    opt_g = torch.optim.Adam(G.parameters(), 1e-3)
    opt_s = torch.optim.Adam(S.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)
    seed_t = time_it(lambda r: seed_pseudo_batch(G, T, S, opt_g, opt_s, args.batch, args.n_s, 250.0, gen), args.reps)
    results["seed_s"] = statistics.median(seed_t)

    variants = [False, True] if args.channels_last else [False]
    for cl in variants:
        data, T, S = models(args.batch, device, cl)
        ctx = SynthContext(
            T,
            S,
            data,
            device,
            80000,
            args.batch,
            Defense(),
            torch.Generator().manual_seed(1),
            torch.Generator().manual_seed(2),
        )
        synth = synthesizer_class("zskt")(ctx, {"n_s": args.n_s})
        if cl:
            synth.generator = synth.generator.to(memory_format=torch.channels_last)
        opt_s = synth.student_optimizer(S.parameters())
        t = time_it(lambda r, synth=synth, S=S, opt_s=opt_s: our_pseudo_batch(synth, S, opt_s, r), args.reps)
        key = "ours_channels_last_s" if cl else "ours_s"
        results[key] = statistics.median(t)
        results[key.replace("_s", "_speedup")] = results["seed_s"] / results[key]
    print(json.dumps(results, indent=2))
    if not args.smoke_test:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
