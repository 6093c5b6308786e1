"""Command line: ``robust-agc {train,eval,report}`` (also ``python -m robust_agc``).

User errors (bad values, unknown names, missing or corrupt files, an existing run folder) print one
line on stderr and exit with status 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("robust_agc")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``robust-agc`` argument parser with its sub-commands."""
    from .config import add_train_arguments

    parser = _Parser(prog="robust-agc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"robust_agc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_train = sub.add_parser(
        "train", help="adversarial (sparse) training", description="Train a model; see README.md."
    )
    add_train_arguments(p_train)
    try:
        from .eval_cli import add_eval_arguments
    except ImportError:  # pragma: no cover - the evaluation harness is part of the package
        add_eval_arguments = None
    if add_eval_arguments is not None:
        add_eval_arguments(
            sub.add_parser("eval", help="evaluate a checkpoint (clean, PGD, AutoAttack)")
        )
    try:
        from .report import add_report_arguments
    except ImportError:  # pragma: no cover
        add_report_arguments = None
    if add_report_arguments is not None:
        add_report_arguments(
            sub.add_parser("report", help="tables and plots from runs and results")
        )
    return parser


def _init_distributed(device: str) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).

    Backend: ``nccl`` for CUDA, ``gloo`` on CPU. Returns ``(rank, local_rank, world_size)``.
    """
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def _run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .config import config_from_args
    from .train import train

    cfg = config_from_args(args)
    rank, local_rank, world = _init_distributed(cfg.device)
    if world > 1 and cfg.device == "cuda":
        cfg.device = f"cuda:{local_rank}"
    if rank > 0:
        logging.getLogger().setLevel(logging.WARNING)
        cfg.progress = False
    try:
        summary, out = train(cfg)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank > 0:
        return 0
    final = summary["final"]
    print(
        f"clean accuracy {final['test_clean_acc']:.4f}, PGD-{cfg.eval_steps} robust accuracy "
        f"{final['test_robust_acc']:.4f} on the first {cfg.eval_subset} test points; run stored in {out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "eval":
            from .eval_cli import run_eval

            return run_eval(args)
        if args.command == "report":
            from .report import run_report

            return run_report(args)
    except (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError) as e:
        print(f"robust-agc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robust-agc: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
