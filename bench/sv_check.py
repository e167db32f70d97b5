"""Can the vaccine check pick a good permutation draw without test data? Per draw, the check's statistics on the
run's own synthesized batches beside the suspect's detection of the real trigger.

    python bench/sv_check.py [--arch wrn16_2 --student-arch wrn16_1] [--attacks blend trojan_3x3] [--seeds 0-2]
                             [--layers auto 4] [--draws 8] [--cache DIR] [--out FILE]

Each (trigger, seed, shuffled depth) runs the real ``distill()`` with SV's check on (``pseudo_test_batches`` 50,
the agreement rule, ``--draws`` tries) until the check ends. At the check, before the defense picks, the wrapper
below replays the same draws from a copy of the defense's generator and measures, per draw: the tail ratio (the
paper's rule: accept above 0.02), the suspect's agreement with the teacher on the collected samples (the agreement
rule keeps the highest), and on the real test set the detection AUC and the % of triggered / clean images the
mask flags. The row then says which draw each rule takes and what that draw flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import git_commit, machine, machine_line, publish  # noqa: E402  (bench/run.py)
from spread import parse_seeds  # noqa: E402

CHECK_BATCHES = 50


def measure_draws(attack: str, seed: int, layers: str, arch: str, student: str, draws: int, cache: str) -> dict:
    """The check's per-draw statistics for one run (stops the run when its check ends)."""
    from abd_ray.attacks import AttackSpec, make_trigger, poisoned_test_set
    from abd_ray.config import RunConfig
    from abd_ray.data import load_dataset
    from abd_ray.defenses.diagnostics import detection_diagnostics
    from abd_ray.defenses.shuffle import draw_permutations
    from abd_ray.defenses.vaccine import ShufflingVaccine
    from abd_ray.defenses.vaccine_check import check_suspect
    from abd_ray.defenses.vaccine_math import suspect_mask
    from abd_ray.engine.distill import distill

    data = load_dataset("digits")
    spec = AttackSpec(name=attack)
    x_poison, _ = poisoned_test_set(data.x_test, data.y_test, make_trigger(spec, data.shape), spec.target)
    x_clean = data.x_test[data.y_test != spec.target]
    per_draw: list[dict] = []
    original = ShufflingVaccine._run_check

    class CheckEnded(Exception):
        pass

    @torch.no_grad()
    def replay_then_check(self: ShufflingVaccine) -> None:
        x, t = torch.cat(self._bank_x), torch.cat(self._bank_t)
        rng = torch.Generator().manual_seed(0)
        rng.set_state(self._rng.get_state())
        first = self.suspect.perms
        for i in range(draws):
            if i > 0:
                self._build(draw_permutations(self.teacher, self.layers, self.params["n_shuf_ens"], rng))
            u = torch.cat([self.suspect(x[j : j + 512]).float() for j in range(0, len(x), 512)])
            det = detection_diagnostics(self.teacher, self.suspect, x_clean, x_poison)
            per_draw.append({"tail": check_suspect(t, u)[1], "agreement": float(suspect_mask(t, u).float().mean()),
                             "auc": det["sv_det_auc"], "mask_poison": det["sv_mask_poison"],
                             "mask_clean": det["sv_mask_clean"]})
        self._build(first)
        original(self)
        per_draw.append({"kept_agreement": self.check_agreement})
        raise CheckEnded

    params = {"pseudo_test_batches": CHECK_BATCHES, "check_rule": "agreement", "check_tries": draws}
    if layers != "auto":
        params["n_shuf_layer"] = int(layers)
    cfg = RunConfig(dataset="digits", attack=spec, teacher_arch=arch, student_arch=student, defense="sv",
                    defense_params=params, steps=200, seed=seed, cache_dir=cache, device="cpu")
    ShufflingVaccine._run_check = replay_then_check
    try:
        distill(cfg, progress=False)
    except CheckEnded:
        pass
    finally:
        ShufflingVaccine._run_check = original
    kept = per_draw.pop()["kept_agreement"]
    by_agreement = max(range(draws), key=lambda i: per_draw[i]["agreement"])
    assert abs(per_draw[by_agreement]["agreement"] - kept) < 1e-9, "the replay drew other permutations than the run"
    by_tail = next((i for i, d in enumerate(per_draw) if d["tail"] > 0.02), None)
    return {"attack": attack, "seed": seed, "layers": layers, "arch": arch, "draws": per_draw,
            "agreement_pick": by_agreement, "tail_pick": by_tail}


def render(rows: list[dict], argv: list[str]) -> str:
    """The RESULTS.md section: per run, the first draw (no check), each rule's pick, and the best draw."""
    out = ["## The vaccine check: picking a permutation draw without test data (digits)", "",
           f"`python bench/sv_check.py {' '.join(argv)}`. Per run of SV on the {rows[0]['arch'] if rows else ''} "
           f"teacher (trigger, seed, shuffled depth), the run's first {len(rows[0]['draws']) if rows else 0} "
           f"permutation draws at the end of its check ({CHECK_BATCHES} synthesized batches after the first 10), "
           "each also measured on the real test set: the % of triggered (non-target images with the trigger) and "
           "of clean non-target images that the suspect's mask flags (agrees with the teacher). Draw 0 is the "
           "run's own draw without a check; the "
           "paper's rule takes the first draw whose tail ratio passes 0.02 (none: SV off); the agreement rule the "
           "draw that agrees with the teacher on the most collected samples; the last column is Spearman's rank "
           "correlation over the draws between that agreement and the flagged triggered %. "
           f"Commit {git_commit()}; {machine_line(machine())}.", "",
           "| trigger | seed | shuffled | draw 0: flagged triggered / clean % | tail rule (max tail) | agreement rule: "
           "draw, agreement, flagged triggered / clean % | best draw's flagged triggered % | rank corr. agreement "
           "vs flagged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["draws"]
        first, pick = d[0], d[r["agreement_pick"]]
        tail = (f"draw {r['tail_pick']}" if r["tail_pick"] is not None else "none: SV off") + \
            f" ({max(x['tail'] for x in d):.4f})"
        corr = rank_corr([x["agreement"] for x in d], [x["mask_poison"] for x in d])
        out.append(f"| {r['attack']} | {r['seed']} | {r['layers']} | {first['mask_poison']:.1f} / "
                   f"{first['mask_clean']:.1f} | {tail} | {r['agreement_pick']}, {pick['agreement']:.3f}, "
                   f"{pick['mask_poison']:.1f} / {pick['mask_clean']:.1f} | "
                   f"{max(x['mask_poison'] for x in d):.1f} | {corr:.2f} |")
    picked = [r["draws"][r["agreement_pick"]]["mask_poison"] for r in rows]
    first = [r["draws"][0]["mask_poison"] for r in rows]
    if rows:
        out += ["", f"Mean flagged triggered % over the {len(rows)} runs: draw 0 {statistics.mean(first):.1f}, the "
                    f"agreement rule's draw {statistics.mean(picked):.1f}."]
    return "\n".join(out)


def rank_corr(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn16_2")
    p.add_argument("--student-arch", default="wrn16_1")
    p.add_argument("--attacks", nargs="+", default=["blend", "trojan_3x3"])
    p.add_argument("--seeds", default="0-2")
    p.add_argument("--layers", nargs="+", default=["auto", "4"], help="n_shuf_layer values ('auto' or k)")
    p.add_argument("--draws", type=int, default=8, help="permutation draws per run (the check's tries; default 8)")
    p.add_argument("--cache", default=".abd_ray/cache", help="teacher cache")
    p.add_argument("--out", default=None, help="rows as JSON (default bench/results/sv_check_<arch>.json)")
    args = p.parse_args(argv)
    args.out = args.out or f"bench/results/sv_check_{args.arch}.json"
    rows = []
    for layers in args.layers:
        for attack in args.attacks:
            for seed in parse_seeds(args.seeds):
                rows.append(measure_draws(attack, seed, layers, args.arch, args.student_arch, args.draws, args.cache))
                r = rows[-1]
                print(f"{attack} seed {seed} layers {layers}: agreement picks draw {r['agreement_pick']} "
                      f"({r['draws'][r['agreement_pick']]['mask_poison']:.1f}% of triggered flagged), draw 0 "
                      f"{r['draws'][0]['mask_poison']:.1f}%", flush=True)
    publish(f"sv_check_{args.arch}", rows, args.out, render(rows, argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
