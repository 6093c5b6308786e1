"""``robust-agc prune SOURCE --method {lwm,hydra,imp} --sparsity S``: a pruning pipeline.

The stages' settings are every ``train`` flag (over the source run's configuration; ``--sparsity``
is the target, ``--epochs`` each training stage's length); see :mod:`robust_agc.prune.pipeline`
and docs/usage.md, "Robust pruning".
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import TrainConfig, add_train_arguments, load_yaml
from ..errors import UserError

__all__ = ["add_prune_command", "run_prune"]

_PIPELINE_KEYS = ("out", "resume", "overwrite")


def add_prune_command(sub: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` sub-parser to ``sub`` (from ``add_subparsers``) and return it."""
    parser = sub.add_parser(
        "prune",
        help="robust pruning pipeline (HYDRA, LWM, IMP) from a trained checkpoint",
        description="Prune a trained model in stages; see docs/usage.md, 'Robust pruning'.",
    )
    parser.add_argument("source", help="checkpoint to prune (a run folder means its best.pt)")
    group = parser.add_argument_group("pipeline")
    group.add_argument(
        "--method",
        required=True,
        choices=("lwm", "hydra", "imp"),
        help="lwm: one-shot magnitude pruning + fine-tuning; hydra: score training + "
        "fine-tuning; imp: iterative magnitude pruning (with --sparse-structure filter: lwm "
        "by the filters' L1 norm, hydra by filter scores)",
    )
    group.add_argument("--rounds", type=int, default=3, help="imp: pruning rounds (default: 3)")
    group.add_argument(
        "--rewind-epoch",
        type=int,
        default=None,
        help="imp: rewind the weights to the source run's epoch<K>.pt after each pruning "
        "(train the source with --save-epochs K)",
    )
    group.add_argument(
        "--score-epochs",
        type=int,
        default=None,
        help="hydra: score-training epochs (default: --epochs)",
    )
    add_train_arguments(parser)
    return parser


def run_prune(args: argparse.Namespace) -> int:
    """Run the pipeline from the parsed arguments; returns the exit status."""
    from ..prune import prune

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    settings.update({k: v for k, v in vars(args).items() if k in known})
    if "sparsity" not in settings:
        raise UserError("prune needs --sparsity (the target fraction of pruned weights)")
    pipeline = {k: settings.pop(k) for k in _PIPELINE_KEYS if k in settings}
    record = prune(
        args.source,
        method=args.method,
        sparsity=float(settings.pop("sparsity")),
        rounds=args.rounds,
        rewind_epoch=args.rewind_epoch,
        score_epochs=args.score_epochs,
        **pipeline,
        **settings,
    )
    last = record["stages"][-1]
    print(
        f"pruned to sparsity {record['sparsity']:.4f} ({record['num_active']} of "
        f"{record['num_maskable']} weights): clean {last['final']['test_clean_acc']:.4f}, "
        f"robust {last['final']['test_robust_acc']:.4f} (per-epoch PGD); "
        f"{record['grad_evals_total']} gradient evaluations with the source's; "
        f"pipeline in {record['out']}"
    )
    return 0
