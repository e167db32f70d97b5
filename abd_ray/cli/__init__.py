"""The ``abd-ray`` command: argument parsing and printing, over the library's functions.

Each subcommand is a pair in a ``COMMANDS`` table of a submodule: ``add(subparsers)`` declares it and ``run(args)``
runs it. The library raises ValueError with one-line messages; here bad input is answered before any compute with
that line on stderr and exit status 2 (a traceback only with ``--debug``). The library never imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad user input: reported in one line, exit status 2."""


def commands() -> dict[str, tuple[Callable, Callable]]:
    """Every subcommand: name -> (add to the parser, run)."""
    from abd_ray.cli import runs, studies

    return {**runs.COMMANDS, **studies.COMMANDS}


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one line on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="abd-ray", description="The ``abd-ray`` command.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in commands().values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return commands()[args.command][1](args) or 0
    except KeyboardInterrupt:
        print("abd-ray: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, UsageError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"abd-ray {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
