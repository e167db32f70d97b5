"""Does the Shuffling Vaccine's suspect tell triggered inputs from clean ones? Its detection ROC-AUC on the real
poisoned test set, per teacher architecture, trigger, number of shuffled convolutions and ensemble size.

    python bench/sv_detection.py [--archs cnn_l wrn16_2] [--attacks badnet_grid blend trojan_3x3] [--draws 5]
                                 [--cache DIR] [--out bench/results/sv_detection.json]

The suspect is what SV steers the generator away from: if it cannot separate triggered from clean test images,
no coefficient makes the vaccine act on that trigger. Each row is the mean +- std over ``--draws`` permutation
draws (the run's seed picks one draw); teachers come from (or go into) the cache, trained by the digits recipe.
Measures only the teacher side: seconds per teacher once it is cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import git_commit, machine, machine_line, publish  # noqa: E402  (bench/run.py)


def measure(archs: list[str], attacks: list[str], draws: int, cache: str, dataset: str) -> list[dict]:
    """One row per arch x attack x shuffled-layer count x ensemble size."""
    from abd_ray.attacks import AttackSpec, make_trigger, poisoned_test_set
    from abd_ray.config import TeacherSpec
    from abd_ray.data import load_dataset
    from abd_ray.defenses.diagnostics import detection_diagnostics
    from abd_ray.defenses.shuffle import ShuffledEnsemble, draw_permutations, resolve_shuffled_layers
    from abd_ray.engine.teacher import get_teacher
    from abd_ray.models.base import conv_layers

    data = load_dataset(dataset)
    rows = []
    for arch in archs:
        for attack_name in attacks:
            spec = TeacherSpec.for_dataset(dataset, AttackSpec(name=attack_name), arch=arch)
            teacher = get_teacher(spec, cache, device="cpu", progress=False)
            model = teacher.model.eval()
            trigger = make_trigger(spec.attack, data.shape)
            x_poison, _ = poisoned_test_set(data.x_test, data.y_test, trigger, spec.attack.target)
            x_clean = data.x_test[data.y_test != spec.attack.target]
            n_convs = len(conv_layers(model))
            auto = len(resolve_shuffled_layers(model, "auto"))
            for k in sorted({1, 2, auto, min(5, n_convs - 1)} - {0}):
                for copies in (3, 6):
                    aucs, masked_p, masked_c = [], [], []
                    for draw in range(draws):
                        layers = resolve_shuffled_layers(model, k)
                        perms = draw_permutations(model, layers, copies, torch.Generator().manual_seed(draw))
                        d = detection_diagnostics(model, ShuffledEnsemble(model, perms), x_clean, x_poison)
                        aucs.append(d["sv_det_auc"])
                        masked_p.append(d["sv_mask_poison"])
                        masked_c.append(d["sv_mask_clean"])
                    row = {"arch": arch, "attack": attack_name, "convs": n_convs, "shuffled": k,
                           "auto": k == auto, "copies": copies, "draws": draws,
                           "teacher_clean_acc": teacher.meta["metrics"]["clean_acc"],
                           "teacher_asr": teacher.meta["metrics"]["asr"],
                           "auc_mean": statistics.mean(aucs), "auc_std": statistics.pstdev(aucs),
                           "mask_poison": statistics.mean(masked_p), "mask_clean": statistics.mean(masked_c)}
                    rows.append(row)
                    print(f"{arch:8s} {attack_name:12s} last {k} of {n_convs}{' (auto)' if row['auto'] else ''}"
                          f" x{copies}: AUC {row['auc_mean']:.3f} +- {row['auc_std']:.3f}, masked triggered "
                          f"{row['mask_poison']:.1f}% clean {row['mask_clean']:.1f}%", flush=True)
    return rows


def render(rows: list[dict], argv: list[str]) -> str:
    """The RESULTS.md section: the command, the commit and the rows as a markdown table."""
    out = ["## The vaccine's suspect on real triggered test images (digits)", "",
           f"`python bench/sv_detection.py {' '.join(argv)}`: the ROC-AUC with which the shuffled ensemble's "
           "divergence from the teacher tells triggered test images (every non-target test image with the trigger) "
           "from clean ones (1.0: every triggered image more suspect than every clean one), and how many of each "
           "SV's mask flags (the suspect agrees with the teacher). Mean +- std over permutation draws. "
           f"Commit {git_commit()}; {machine_line(machine())}.", "",
           "| teacher | trigger | teacher acc / asr | shuffled | copies | AUC (mean +- std) | masked triggered % | "
           "masked clean % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['arch']} | {r['attack']} | {r['teacher_clean_acc']:.1f} / {r['teacher_asr']:.1f} | "
                   f"last {r['shuffled']} of {r['convs']}{' (auto)' if r['auto'] else ''} | {r['copies']} | "
                   f"{r['auc_mean']:.3f} +- {r['auc_std']:.3f} ({r['draws']}) | {r['mask_poison']:.1f} | "
                   f"{r['mask_clean']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["cnn_l", "wrn16_2"])
    p.add_argument("--attacks", nargs="+", default=["badnet_grid", "blend", "trojan_3x3"])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--draws", type=int, default=5, help="permutation draws per row (default 5)")
    p.add_argument("--cache", default=".abd_ray/cache", help="teacher cache")
    p.add_argument("--out", default="bench/results/sv_detection.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.archs, args.attacks, args.draws, args.cache, args.dataset)
    publish("sv_detection", rows, args.out, render(rows, argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
