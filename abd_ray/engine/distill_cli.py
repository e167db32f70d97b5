"""``abd-ray distill``: one distillation without Ray, its teacher from the cache (trained if missing)."""

from __future__ import annotations

import argparse

from abd_ray.cli import (
    _add_common_data,
    _check_data_root,
    _print_json,
    attack_spec_from_args,
    check_trigger,
    register_command,
)

JSON_KEYS = ("clean_acc", "asr", "robust_acc", "teacher_clean_acc", "teacher_asr", "wall_s")


def add(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a student from a (poisoned) teacher with one synthesizer and defense",
        description="One data-free distillation: teacher from the cache (trained if missing), a progress bar with "
        "live clean_acc / asr, and a summary (or one JSON object with --json).",
    )
    _add_common_data(p)
    p.add_argument("--synthesizer", default="zskt", help="synthesizer name (see `abd-ray list`)")
    p.add_argument("--defense", default="none", help="defense name: none, sv, sr, abd (see `abd-ray list`)")
    p.add_argument("--teacher-arch", default=None, help="teacher architecture (default: the dataset's)")
    p.add_argument("--student-arch", default=None, help="student architecture (default: the dataset's)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="run seed (student init, synthesis, data order)")
    p.add_argument("--teacher-file", default=None, help="distil from this teacher artifact or weights file")
    p.add_argument(
        "--student-file",
        default=None,
        help="start the student from these weights (e.g. a trial's student.safetensors); with --defense sr "
        "--set defense.sr_start=0 this runs SR as a second stage on a saved student",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key, e.g. synth.beta=0, defense.coef=1, steps=100, eval_every=50 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    """The RunConfig the arguments describe (``--set`` keys override the flags)."""
    from dataclasses import asdict

    from abd_ray.config import RunConfig, parse_sets

    flat = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "synthesizer": args.synthesizer,
        "defense": args.defense,
        "teacher_arch": args.teacher_arch,
        "student_arch": args.student_arch,
        "steps": args.steps,
        "seed": args.seed,
        "teacher_file": args.teacher_file,
        "student_file": args.student_file,
        "cache_dir": args.cache,
        "device": args.device,
    }
    flat.update({f"attack.{k}": v for k, v in asdict(attack_spec_from_args(args)).items()})
    flat.update(parse_sets(args.sets))
    return RunConfig.from_flat(flat)


def run(args: argparse.Namespace) -> int:
    from abd_ray.engine.distill import check_config, describe, distill

    cfg = config_from_args(args)
    cfg, _, _ = check_config(cfg)  # every bad input is reported here, before any compute
    _check_data_root(cfg.dataset, cfg.data_root)
    if cfg.teacher_file is None:
        check_trigger(cfg.attack, cfg.dataset)  # a bad pattern file fails here, not after the teacher stage
    else:
        from abd_ray.engine.teacher import load_external

        load_external(cfg.teacher_file, cfg.teacher_spec())  # refused here (code payload, misfit) before compute
    if cfg.student_file is not None:
        from abd_ray.data import dataset_info
        from abd_ray.engine.distill import load_student
        from abd_ray.models import build_model

        d = dataset_info(cfg.dataset)
        blank = build_model(cfg.student_arch, num_classes=d.num_classes, shape=d.shape, mean=(0.0,), std=(1.0,))
        load_student(blank, cfg.student_file)  # a misfit or a code payload is refused here, before compute
    result = distill(cfg, progress=not args.json)
    m = result.metrics
    if args.json:
        _print_json({k: m.get(k) for k in JSON_KEYS})
    else:
        print(
            f"distill {cfg.dataset} / {cfg.attack.name} / {cfg.synthesizer} / defense {cfg.defense}: "
            f"{cfg.teacher_arch} -> {cfg.student_arch}, {cfg.steps} steps of batch {cfg.batch_size}"
        )
        print("  " + describe(m))
    return 0


register_command("distill", add, run)
