"""The ``abd-ray`` command.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares it and ``cmd_<name>(args)`` runs it. Bad input
is answered before any compute with one line on stderr and exit status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad user input: reported in one line, exit status 2."""


def _print_json(obj: Any) -> None:
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
        _print_json(listing)
    else:
        for kind, names in listing.items():
            print(f"{kind:>12}: {', '.join(names) or '(none yet)'}")
    return 0


# --- teacher ----------------------------------------------------------------------------------------------------


def _add_common_data(p) -> None:
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
    _add_common_data(p)
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

    spec = TeacherSpec.for_dataset(
        args.dataset, attack_spec_from_args(args), arch=args.arch, epochs=args.epochs, seed=args.seed
    )
    spec.validate()
    resolve_device(args.device)
    check_trigger(spec.attack, spec.dataset)
    _check_data_root(args.dataset, args.data_root)
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
        _print_json(out)
    else:
        state = "reused from the cache" if teacher.cached else "trained"
        print(f"teacher {spec.arch} on {spec.dataset} / {spec.attack.name}: {state} in {out['wall_s']} s")
        print(f"  clean_acc {out['clean_acc']:.2f}  asr {out['asr']:.2f}  robust_acc {out['robust_acc']:.2f}")
        print(f"  {out['path']}")
        if teacher.trained_elsewhere:
            print(f"  trained in another environment: {'; '.join(teacher.trained_elsewhere)}")
    return 0


def check_trigger(attack, dataset: str) -> None:
    """Build the attack's trigger once, so an unreadable pattern or mask file fails before any compute."""
    from abd_ray.attacks import make_trigger
    from abd_ray.data import dataset_info

    if attack.active:
        make_trigger(attack, dataset_info(dataset).shape)


def _check_data_root(dataset: str, data_root: str | None) -> None:
    """Fail before compute when a dataset that needs files has none (the loader names what is missing)."""
    from abd_ray.data import dataset_info, load_dataset

    if dataset_info(dataset).needs_root:
        load_dataset(dataset, data_root)


# --- main ----------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "list": (_add_list, cmd_list),
    "teacher": (_add_teacher, cmd_teacher),
}


def register_command(name: str, add: Callable, run: Callable) -> None:
    """Add a subcommand (used by modules that bring their own, e.g. the study layer)."""
    COMMANDS[name] = (add, run)


def _load_plugins() -> None:
    # Subcommands living next to the code they drive; imported lazily so `abd-ray list` stays fast.
    for mod in ("abd_ray.engine.distill_cli", "abd_ray.study.cli"):
        try:
            __import__(mod)
        except ModuleNotFoundError as e:
            if not (e.name and mod.startswith(e.name)):
                raise


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one line on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = _Parser(prog="abd-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt:
        print("abd-ray: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, UsageError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"abd-ray {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run through the package module, so that plugin subcommands register where main() looks for them.
    from abd_ray.cli import main as _main

    sys.exit(_main())
