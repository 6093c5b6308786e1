"""Command line: ``robust-agc {train,eval,report,prune,export}`` (also ``python -m robust_agc``).

User errors (bad values, unknown names, missing or corrupt files, an existing run folder) print one
line on stderr and exit with status 2; nothing is overwritten.

Each sub-command lives in its own module and offers two public functions, one that adds its
arguments to a parser and one that runs it from the parsed namespace and returns the exit status:

- ``train``: :mod:`robust_agc.cli.train` (``add_train_command``, ``run_train``);
- ``eval``: :mod:`robust_agc.cli.eval` (``add_eval_arguments``, ``run_eval``);
- ``report``: :mod:`robust_agc.cli.report` (``add_report_command``, ``run_report``);
- ``prune``: :mod:`robust_agc.cli.prune` (``add_prune_command``, ``run_prune``);
- ``export``: :mod:`robust_agc.cli.export` (``add_export_command``, ``run_export``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import UserError
from .eval import add_eval_arguments, run_eval
from .export import add_export_command, run_export
from .prune import add_prune_command, run_prune
from .report import add_report_command, run_report
from .train import add_train_command, run_train

__all__ = ["main", "build_parser", "OneLineParser"]

logger = logging.getLogger("robust_agc")

USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError)
"""Exceptions that are the user's doing: one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": run_train,
    "eval": run_eval,
    "report": run_report,
    "prune": run_prune,
    "export": run_export,
}
"""Sub-command name -> the function that runs it (returns the exit status)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``robust-agc`` argument parser with its sub-commands."""
    parser = OneLineParser(prog="robust-agc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"robust_agc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_command(sub)
    add_eval_arguments(
        sub.add_parser("eval", help="evaluate a checkpoint (clean, PGD, AutoAttack)")
    )
    add_report_command(sub)
    add_prune_command(sub)
    add_export_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    command = COMMANDS.get(args.command)
    if command is None:  # pragma: no cover - argparse only accepts the registered names
        parser.error(f"unknown command {args.command!r}")
        return 2
    try:
        return command(args)
    except USER_ERRORS as e:
        print(f"robust-agc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robust-agc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
