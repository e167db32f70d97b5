"""The subcommands of single runs: ``list`` (the registries), ``teacher`` (train or reuse one poisoned teacher) and
``distill`` (one distillation without Ray, its teacher from the cache, trained if missing)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=None, sort_keys=True, default=str))


# --- list ----------------------------------------------------------------------------------------------------


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list every registered dataset, attack, model, synthesizer and defense")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def registry_listing() -> dict[str, list[str]]:
    from abd_ray.attacks import attack_names
    from abd_ray.models import classifier_names, generator_names
    from abd_ray.registry import DATASETS, DEFENSES, SYNTHESIZERS, load_all

    load_all()
    return {
        "datasets": DATASETS.names(),
        "attacks": [a for a in attack_names() if a != "none"],
        "models": classifier_names(),
        "generators": generator_names(),
        "synthesizers": SYNTHESIZERS.names(),
        "defenses": DEFENSES.names(),
    }


def cmd_list(args) -> int:
    listing = registry_listing()
    if args.json:
        print_json(listing)
    else:
        for kind, names in listing.items():
            print(f"{kind:>12}: {', '.join(names) or '(none yet)'}")
    return 0


# --- teacher ----------------------------------------------------------------------------------------------------


def add_common_data(p) -> None:
    p.add_argument("--dataset", default="digits", help="dataset name (default: digits, shipped with scikit-learn)")
    p.add_argument(
        "--data-root", default=None, help="folder of the torchvision datasets (default: $ABD_RAY_DATA or ./data)"
    )
    p.add_argument("--attack", default="badnet_grid", help="attack name, or 'none' for a clean teacher")
    p.add_argument("--target", type=int, default=None, help="target class (default: the dataset's, 0 or 1)")
    p.add_argument("--poison-ratio", type=float, default=0.1, help="poisoned fraction of the training set")
    p.add_argument("--pattern-file", default=None, help="a PNG/NPY pattern replacing the procedural one")
    p.add_argument("--mask-file", default=None, help="a PNG/NPY mask for the pattern")
    p.add_argument("--cache", default=os.environ.get("ABD_RAY_CACHE", ".abd_ray/cache"), help="teacher cache root")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_teacher(sub) -> None:
    p = sub.add_parser("teacher", help="train (or reuse from the cache) a poisoned teacher and print its metrics")
    add_common_data(p)
    p.add_argument("--arch", default=None, help="teacher architecture (default: the dataset's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of the trigger pattern and poisoned indices")
    p.add_argument(
        "--teacher-file",
        default=None,
        help="evaluate someone else's teacher (artifact folder, .safetensors or .pt state_dict) "
        "instead of training one; loaded weights-only",
    )


def attack_spec_from_args(args):
    from abd_ray.attacks import AttackSpec
    from abd_ray.config import dataset_defaults

    target = args.target if args.target is not None else dataset_defaults(args.dataset)["target"]
    return AttackSpec(
        args.attack, target, args.poison_ratio, getattr(args, "attack_seed", 0), args.pattern_file, args.mask_file
    )


def cmd_teacher(args) -> int:
    import time

    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import cache_folder, get_teacher, resolve_device
    from abd_ray.study.preflight import check_data_root, check_trigger

    spec = TeacherSpec.for_dataset(
        args.dataset, attack_spec_from_args(args), arch=args.arch, epochs=args.epochs, seed=args.seed
    )
    spec.validate()
    resolve_device(args.device)
    check_trigger(spec.attack, spec.dataset)
    check_data_root(args.dataset, args.data_root)
    t0 = time.perf_counter()
    if args.teacher_file:
        from abd_ray.data import load_dataset
        from abd_ray.engine.teacher import load_external, teacher_metrics

        teacher = load_external(args.teacher_file, spec)
        spec = teacher.spec
        teacher.meta["metrics"] = teacher_metrics(teacher.model, load_dataset(spec.dataset, args.data_root), spec)
        path = str(teacher.path)
    else:
        teacher = get_teacher(spec, args.cache, args.data_root, args.device, progress=not args.json)
        path = str(cache_folder(spec, args.cache))
    out = {
        **teacher.metrics,
        "path": path,
        "cached": teacher.cached,
        "environment": teacher.meta.get("environment"),
        "trained_elsewhere": teacher.trained_elsewhere,
        "arch": spec.arch,
        "dataset": spec.dataset,
        "attack": spec.attack.name,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print_json(out)
    else:
        state = "reused from the cache" if teacher.cached else "trained"
        print(f"teacher {spec.arch} on {spec.dataset} / {spec.attack.name}: {state} in {out['wall_s']} s")
        print(f"  clean_acc {out['clean_acc']:.2f}  asr {out['asr']:.2f}  robust_acc {out['robust_acc']:.2f}")
        print(f"  {out['path']}")
        if teacher.trained_elsewhere:
            print(f"  trained in another environment: {'; '.join(teacher.trained_elsewhere)}")
    return 0


# --- distill ----------------------------------------------------------------------------------------------------

JSON_KEYS = ("clean_acc", "asr", "robust_acc", "teacher_clean_acc", "teacher_asr", "wall_s")


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a student from a (poisoned) teacher with one synthesizer and defense",
        description="One data-free distillation: teacher from the cache (trained if missing), a progress bar with "
        "live clean_acc / asr, and a summary (or one JSON object with --json).",
    )
    add_common_data(p)
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
        "--profile",
        default="default",
        help="a named set of synthesizer and defense values under the --set ones: default, or paper (the published "
        "code's; with --json the resolved config is printed)",
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
        "profile": args.profile,
    }
    flat.update({f"attack.{k}": v for k, v in asdict(attack_spec_from_args(args)).items()})
    flat.update(parse_sets(args.sets))
    return RunConfig.from_flat(flat)


def cmd_distill(args: argparse.Namespace) -> int:
    from abd_ray.engine.distill import check_config, describe, distill
    from abd_ray.study.preflight import check_data_root, check_trigger

    cfg = config_from_args(args)
    cfg, _, _ = check_config(cfg)  # every bad input is reported here, before any compute
    check_data_root(cfg.dataset, cfg.data_root)
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
        out = {k: m.get(k) for k in JSON_KEYS}
        # The rest of the last evaluation (losses, learning rate, the defense's metrics and diagnostics).
        out["details"] = {k: v for k, v in sorted(m.items()) if k not in JSON_KEYS}
        if cfg.profile != "default":
            out["config"] = cfg.to_flat()  # the profile's values as the run resolved them
        print_json(out)
    else:
        print(
            f"distill {cfg.dataset} / {cfg.attack.name} / {cfg.synthesizer} / defense {cfg.defense}: "
            f"{cfg.teacher_arch} -> {cfg.student_arch}, {cfg.steps} steps of batch {cfg.batch_size}"
        )
        print("  " + describe(m))
    return 0


COMMANDS = {
    "list": (_add_list, cmd_list),
    "teacher": (_add_teacher, cmd_teacher),
    "distill": (_add_distill, cmd_distill),
}
