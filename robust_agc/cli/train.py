"""``robust-agc train``: the sub-command's arguments (one flag per config field) and its body."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config import add_train_arguments, config_from_args
from ..utils.dist import init_distributed

__all__ = ["add_train_command", "run_train"]


def add_train_command(sub: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-parser to ``sub`` (from ``add_subparsers``) and return it."""
    parser = sub.add_parser(
        "train",
        help="adversarial (sparse) training",
        description="Train a model; see docs/usage.md.",
    )
    add_train_arguments(parser)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Train from the parsed arguments (also under ``torchrun``); returns the exit status.

    Rank 0 prints one summary line; other ranks log warnings only and draw no progress bar.
    """
    import torch.distributed as dist

    from ..train import train

    cfg = config_from_args(args)
    rank, local_rank, world = init_distributed(cfg.device)
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
    guard = summary.get("collapse_guard") or {}
    if guard.get("stopped"):
        how = (
            f"rolled back to epoch {guard['rolled_back_to']}"
            if guard.get("rolled_back_to") is not None
            else "stopped"
        )
        print(f"catastrophic overfitting at epoch {guard['flagged'][-1]}: {how}")
    if not final:  # rolled back to the initial state: no epoch kept
        print(f"no trained epoch kept; run stored in {out}")
        return 0
    print(
        f"clean accuracy {final['test_clean_acc']:.4f}, PGD-{cfg.eval_steps} robust accuracy "
        f"{final['test_robust_acc']:.4f} on the first {cfg.eval_subset} test points; run stored in {out}"
    )
    return 0
