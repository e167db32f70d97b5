"""Benchmark: how far results scatter over run seeds when nothing meaningful changes.

    python bench/spread.py [--seeds 0-4] [--resume] [--cache DIR] [--out DIR]   # run (resumable)
    python bench/spread.py --render                                             # table only
    python bench/spread.py --arms none sv sr abd --seeds 0-2 --resume          # the defense ablation

zskt on digits, triggers badnet_grid / blend / trojan_3x3, undefended and with abd (the spread), or any of the
``ARMS`` (the ablation: each arm a defense and the flags that set its form), at the default budget, one
``abd-ray distill --json`` process per run (the user's command, nothing else). One JSON record per finished run
under bench/results/spread/ (its metrics, the commit, the teacher's weights hash and training environment);
``--resume`` skips the runs already recorded, so the benchmark can be split across sessions; several processes
started with the same arguments share the work (a run is claimed by a ``.claim`` file holding the claimant's
pid). The run seed seeds the student, the synthesis and the defense; the teacher's seed is ``teacher_seed`` (0),
so every seed of one trigger distils the same teacher. Writes the ``spread`` section of bench/RESULTS.md (mean +-
std (n) per cell), and with ``--arms`` the ``ablation`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import ROOT, git_commit, machine, machine_line, update_section  # noqa: E402  (bench/run.py)

ATTACKS = ("badnet_grid", "blend", "trojan_3x3")
DEFENSES = ("none", "abd")  # the spread's arms


def _sets(values: dict) -> list[str]:
    """``--set defense.<key>=<value>`` flags for ``values`` (None as YAML's null)."""
    return [f for k, v in values.items() for f in ("--set", f"defense.{k}={'null' if v is None else v}")]


def _paper_sr() -> dict:
    from abd_ray.profiles import PAPER

    return PAPER["zskt"]["sr"]


# The paper's SV shuffles its last 5 "conv"-named layers of 16; the digits CNNs have 3 convolutions and no such
# names, so the paper arms keep the share of the depth (the last 1 of 3) to stay comparable.
_DIGITS_DEPTH = ["--set", "defense.layer_count=all_convs", "--set", "defense.n_shuf_layer=auto"]
_AGREEMENT_CHECK = {"pseudo_test_batches": 50, "check_rule": "agreement"}
_WRN_PAIR = ["--teacher-arch", "wrn16_2", "--student-arch", "wrn16_1"]
# An arm: the defense and the extra ``abd-ray distill`` flags that set its form. A plain defense name runs the
# defense at its defaults, so the spread's records are the ablation's none and abd arms. ``-paper`` arms run the
# published code's forms (abd_ray/profiles.py): ``sr-paper`` / ``abd-srpaper`` only SR's (beside today's SV), the
# ``*-paper`` arms with ``--profile paper`` every form, synthesizer included.
ARMS: dict[str, tuple[str, list[str]]] = {
    "none": ("none", []),
    "sv": ("sv", []),
    "sr": ("sr", []),
    "abd": ("abd", []),
    "sr-paper": ("sr", _sets(_paper_sr())),
    "abd-srpaper": ("abd", _sets(_paper_sr())),
    # The paper's SR ran over 401-601 pseudo batches; its share of the budget (0.75%) leaves 22 of digits' 3,000,
    # so this arm gives the published form the share abd-ray's default gives SR (the last 10%).
    "abd-srpaper90": ("abd", _sets({**_paper_sr(), "sr_start": 0.9})),
    # A stronger vaccine: the top of the search benchmark's coef grid (bench/RESULTS.md, "Search efficiency").
    "sv-coef10": ("sv", _sets({"coef": 10.0})),
    # The vaccine's fixed-data reweighting on the generator's outputs too: suspect samples teach the student nothing
    # (drop) or are pushed away up to a cap (capped).
    "sv-gendrop": ("sv", _sets({"gen_mode": "drop"})),
    "sv-gencapped": ("sv", _sets({"gen_mode": "capped"})),
    # The paper's pair on digits (16 convolutions, so the vaccine shuffles the last 5 of them as the paper does).
    "none-wrn": ("none", _WRN_PAIR),
    "sv-wrn": ("sv", _WRN_PAIR),
    "abd-wrn": ("abd", _WRN_PAIR),
    # One convolution fewer than the paper's 5: on WRN-16-2 the suspect then keeps blend and trojan_3x3's backdoors
    # on more of their triggered images (bench/RESULTS.md, "The vaccine's suspect per shuffled depth").
    "sv4-wrn": ("sv", [*_WRN_PAIR, *_sets({"n_shuf_layer": 4})]),
    # The vaccine check with the agreement rule: of 8 permutation draws, the one whose suspect agrees with the
    # teacher on the most of the run's first synthesized batches.
    "sva": ("sv", _sets(_AGREEMENT_CHECK)),
    "sva-wrn": ("sv", [*_WRN_PAIR, *_sets(_AGREEMENT_CHECK)]),
    "sv4a-wrn": ("sv", [*_WRN_PAIR, *_sets({"n_shuf_layer": 4, **_AGREEMENT_CHECK})]),
    # The same depth, and the student's KD ignores the samples the suspect flags.
    "sv4drop-wrn": ("sv", [*_WRN_PAIR, *_sets({"n_shuf_layer": 4, "gen_mode": "drop"})]),
    "none-paper": ("none", ["--profile", "paper"]),
    "sv-paper": ("sv", ["--profile", "paper", *_DIGITS_DEPTH]),
    "abd-paper": ("abd", ["--profile", "paper", *_DIGITS_DEPTH]),
    # Every published form on the paper's pair: its vaccine finds its last 5 "conv"-named layers of 16 itself.
    "none-paper-wrn": ("none", ["--profile", "paper", *_WRN_PAIR]),
    "abd-paper-wrn": ("abd", ["--profile", "paper", *_WRN_PAIR]),
}
OUT = HERE / "results" / "spread"


def parse_seeds(text: str) -> list[int]:
    """``0-4`` or ``0,2,3``."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def runs(seeds: list[int], arms: tuple[str, ...] = DEFENSES) -> list[tuple[str, str, int]]:
    """(attack, arm, seed), seed by seed, so a partial benchmark has every cell at its first seeds."""
    return [(a, d, s) for s in seeds for a in ATTACKS for d in arms]


def record_path(out: Path, attack: str, arm: str, seed: int) -> Path:
    return out / f"zskt_{attack}_{arm}_seed{seed}.json"


def command(attack: str, arm: str, seed: int, cache: str, steps: int | None) -> list[str]:
    defense, flags = ARMS[arm]
    cmd = [
        sys.executable,
        "-m",
        "abd_ray.cli",
        "distill",
        "--dataset",
        "digits",
        "--attack",
        attack,
        "--synthesizer",
        "zskt",
        "--defense",
        defense,
        "--seed",
        str(seed),
        "--cache",
        cache,
        "--json",
        *flags,
    ]
    return cmd + (["--steps", str(steps)] if steps else [])


def teacher_record(cmd: list[str]) -> dict:
    """The weights hash, key and training environment of the cached teacher that the distill command ``cmd`` used
    (its spec read from the command's own arguments)."""
    from abd_ray.cli import build_parser
    from abd_ray.cli.runs import config_from_args
    from abd_ray.engine.teacher import META, cache_folder

    cfg = config_from_args(build_parser().parse_args(cmd[3:])).resolved()
    meta = json.loads((cache_folder(cfg.teacher_spec(), cfg.cache_dir) / META).read_text())
    return {
        "weights_sha256": meta["weights_sha256"],
        "key": meta["key"],
        "environment": meta.get("environment"),
        "clean_acc": meta["metrics"]["clean_acc"],
        "asr": meta["metrics"]["asr"],
    }


def run_one(attack: str, arm: str, seed: int, cache: str, steps: int | None) -> dict:
    cmd = command(attack, arm, seed, cache, steps)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "synthesizer": "zskt",
        "attack": attack,
        "defense": ARMS[arm][0],
        "arm": arm,
        "seed": seed,
        "steps": steps or "default",
        "metrics": metrics,
        "teacher": teacher_record(cmd),
        "commit": git_commit(),
        "machine": machine()["cpu"],
        "process_s": round(time.perf_counter() - t0, 1),
        "load_1m": round(os.getloadavg()[0], 2),
        "command": "abd-ray " + " ".join(cmd[3:]),
    }


def claim(path: Path) -> bool:
    """Claim the run recorded at ``path`` for this process; False when another live process holds it."""
    c = path.with_suffix(".claim")
    for _ in range(2):
        try:
            with open(c, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                os.kill(int(c.read_text() or 0), 0)
                return False  # its claimant is alive
            except (ProcessLookupError, ValueError):
                c.unlink(missing_ok=True)  # a claim left by a process that died
    return False


def teacher_hash(record: dict) -> str:
    return record["teacher"]["weights_sha256"][:12]


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("zskt_*.json"))]


def arm_of(record: dict) -> str:
    return record.get("arm", record["defense"])


# Records made before each run named its CPU: all on the machine of the RESULTS lines of that time (their
# teachers' weights agree bit for bit, which another CPU model does not give).
UNNAMED_MACHINE = "Intel(R) Xeon(R) Processor"


def machine_of(record: dict) -> str:
    return record.get("machine", UNNAMED_MACHINE)


def table(records: list[dict], seeds: list[int], arms: tuple[str, ...] = DEFENSES, replica: str | None = None) -> str:
    """The spread (or ablation) section: mean +- std (n) of clean_acc and asr per cell and teacher, and what
    remains to run.

    A cell's runs are pooled per teacher weights: one spec trains to other weights on another CPU model, and a
    mean over seeds is a mean over the student's draws at one teacher. ``replica``: the records' folder, for a
    section of runs repeated apart from the main records (another machine's teachers)."""
    from abd_ray.stats import format_mean_std

    records = [r for r in records if arm_of(r) in arms and r["seed"] in seeds]
    done = {(r["attack"], arm_of(r), r["seed"]) for r in records}
    todo = [r for r in runs(seeds, arms) if r not in done]
    commits = sorted({r["commit"] or "?" for r in records})
    ablation = arms != DEFENSES
    arm_flags = f" --arms {' '.join(arms)}" if ablation else ""
    if replica:
        arm_flags += f" --out {replica}"
    title = "Defense ablation (zskt, digits)" if ablation else "Spread over run seeds (zskt, digits)"
    if replica:
        title += f", records in {replica}"
    lines = [
        f"## {title}" + (" -- PARTIAL" if todo else ""),
        "",
        f"`{Path(sys.executable).name} bench/spread.py{arm_flags} --seeds {seeds[0]}-{seeds[-1]} --resume` "
        "(one `abd-ray "
        "distill --dataset digits --synthesizer zskt --attack A --defense D --seed S --json` process per run, "
        "default budget, one fresh teacher cache; the run seed changes the student, the synthesis and the defense, "
        "not the teacher, whose seed is `teacher_seed` = 0). Cells: mean +- sample std (n runs), min..max.",
        "",
        f"Commit(s): {', '.join(commits)}; rendered on {machine_line(machine())}; runs made on "
        + "; ".join(f"{m} ({n} run{'s' * (n != 1)})" for m, n in sorted(Counter(map(machine_of, records)).items()))
        + ".",
        "",
        *(["Arms: " + "; ".join(f"`{a}` = `--defense {ARMS[a][0]}{' ' if ARMS[a][1] else ''}"
                                 f"{' '.join(ARMS[a][1])}`" for a in arms) + ".", ""] if ablation else []),
        "| attack | defense | clean_acc | clean min..max | asr | asr min..max | seeds | teacher weights_sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in ATTACKS:
        for d in arms:
            cell = [r for r in records if r["attack"] == a and arm_of(r) == d]
            if not cell:
                lines.append(f"| {a} | {d} | n/a | | n/a | | none yet | |")
                continue
            cell.sort(key=lambda r: r["seed"])
            for h in dict.fromkeys(map(teacher_hash, cell)):  # teachers in the order of their first seed
                rs = [r for r in cell if teacher_hash(r) == h]
                ca = [r["metrics"]["clean_acc"] for r in rs]
                asr = [r["metrics"]["asr"] for r in rs]
                lines.append(
                    f"| {a} | {d} | {format_mean_std(ca)} | {min(ca):.1f}..{max(ca):.1f} | {format_mean_std(asr)} | "
                    f"{min(asr):.1f}..{max(asr):.1f} | {','.join(str(r['seed']) for r in rs)} | {h} |"
                )
    if ablation:
        from abd_ray.study.report import sr_effect, sr_effect_lines

        # The arms as a study's grid trials (the arm's name as the defense, so only `abd` and `sv` pair).
        rows = [{"cell": f"{r['attack']}/zskt", "defense": arm_of(r), "seed": r["seed"], "kind": "grid",
                 "clean_acc": r["metrics"]["clean_acc"], "asr": r["metrics"]["asr"], "wall_s": r["process_s"]}
                for r in records]
        lines += sr_effect_lines(sr_effect(rows))
    if todo:
        lines += [
            "",
            f"Not run yet ({len(todo)} of {len(runs(seeds, arms))}): "
            + ", ".join(f"{a}/{d}/seed{s}" for a, d, s in todo)
            + f". Resume with `OMP_NUM_THREADS=1 nohup python bench/spread.py{arm_flags} "
            f"--seeds {seeds[0]}-{seeds[-1]} "
            "--resume > bench/results/spread.log 2>&1 &` (a second such process shares the runs).",
        ]
    return "\n".join(lines) + "\n"


def section_name(arms: tuple[str, ...], replica: str | None = None) -> str:
    """The RESULTS.md section of a run of this benchmark: ``spread``, ``ablation``, or a replica's own."""
    name = "spread" if arms == DEFENSES else "ablation"
    return f"{name}_{Path(replica).name}" if replica else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-4", help="run seeds, e.g. 0-4 or 0,3 (default 0-4)")
    p.add_argument("--arms", nargs="+", default=list(DEFENSES), choices=sorted(ARMS),
                   help="defense arms (default: none abd, the spread); more arms write the ablation section")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS,
                   help="run these triggers only (the table still lists every trigger's cells)")
    p.add_argument("--resume", action="store_true", help="skip the runs already recorded under --out")
    p.add_argument("--cache", default=str(ROOT / ".abd_ray" / "spread_cache"), help="teacher cache of the runs")
    p.add_argument("--out", default=str(OUT),
                   help="folder of the per-run records; another folder writes its own RESULTS.md section")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the digits budget)")
    p.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from the records")
    p.add_argument("--smoke-test", action="store_true", help="two runs of 5 steps into a temporary folder")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    arms = tuple(args.arms)
    out = Path(args.out)
    if args.smoke_test:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="spread_smoke_"))
        out, args.cache, args.steps, todo = (
            tmp / "runs",
            str(tmp / "cache"),
            5,
            [("badnet_grid", "none", 0), ("badnet_grid", "abd", 0)],
        )
    else:
        todo = [r for r in runs(seeds, arms) if r[0] in args.attacks]
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        for attack, defense, seed in todo:
            path = record_path(out, attack, defense, seed)
            if args.resume and path.exists() or not claim(path):
                continue
            try:
                rec = run_one(attack, defense, seed, args.cache, args.steps)
                path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
            finally:
                path.with_suffix(".claim").unlink(missing_ok=True)
            print(json.dumps(rec, sort_keys=True), flush=True)
    replica = None if out.resolve() == OUT.resolve() else os.path.relpath(out, ROOT)
    md = table(load_records(out), seeds, arms, replica)
    print(md)
    if not args.smoke_test:
        update_section(section_name(arms, replica), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
