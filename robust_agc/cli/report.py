"""``robust-agc report``: the sub-command's arguments and its body (the work is in
:mod:`robust_agc.reporting`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..reporting import build_report

__all__ = ["add_report_arguments", "add_report_command", "run_report"]

logger = logging.getLogger(__name__)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` sub-command's arguments to ``parser``."""
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_RESULT",
        help="run folders, folders of runs, result JSONs",
    )
    parser.add_argument("--out", required=True, help="output folder for report.md and the plots")
    parser.add_argument(
        "--facet",
        default=None,
        metavar="KEYS",
        help="comma-separated config keys (e.g. sparse_method,sparsity): one row of accuracy and "
        "coefficient panels per value",
    )


def add_report_command(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` sub-parser to ``sub`` (from ``add_subparsers``) and return it."""
    parser = sub.add_parser("report", help="tables and plots from runs and results")
    add_report_arguments(parser)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Run ``robust-agc report``; returns the exit status (0). User errors raise UserError."""
    facet = [k.strip() for k in (getattr(args, "facet", None) or "").split(",") if k.strip()]
    md = build_report(args.paths, args.out, facet)
    logger.info("report: %s", md)
    return 0
