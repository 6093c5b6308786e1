"""Compatibility shim: ``robust-agc report`` and its pieces now live in :mod:`robust_agc.reporting`
(records, groups, tables, plots, statistics) and :mod:`robust_agc.cli.report` (the sub-command's
arguments and body). Import from there; this module re-exports the old public names."""

from .cli.report import add_report_arguments, run_report
from .reporting import (
    IGNORED_CONFIG_KEYS,
    Run,
    build_report,
    collect,
    eval_table,
    group_runs,
    load_eval_result,
    load_run,
    make_plots,
    mean_std,
    run_table,
)

__all__ = [
    "IGNORED_CONFIG_KEYS",
    "Run",
    "load_run",
    "load_eval_result",
    "collect",
    "group_runs",
    "run_table",
    "eval_table",
    "mean_std",
    "make_plots",
    "build_report",
    "add_report_arguments",
    "run_report",
]
