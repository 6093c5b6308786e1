"""Reporting: run folders and evaluation results -> groups over seeds -> markdown tables, plots,
and study grids. Used by ``robust-agc report`` (:mod:`robust_agc.cli.report`) and by the scripts
in ``experiments/``.

- :mod:`~robust_agc.reporting.runs`: run folders and result files -> :class:`Run` records;
- :mod:`~robust_agc.reporting.groups`: runs -> groups (config without the seed), labels, facets;
- :mod:`~robust_agc.reporting.stats`: ``mean ± std`` formatting and Student-t intervals;
- :mod:`~robust_agc.reporting.tables`: markdown tables of groups and of evaluations;
- :mod:`~robust_agc.reporting.curves`: security curves of evaluation records (one per model);
- :mod:`~robust_agc.reporting.plots`: PNG plots of groups and of security curves;
- :mod:`~robust_agc.reporting.build`: ``report.md`` with its tables and plots;
- :mod:`~robust_agc.reporting.studies`: study files (a grid of configurations x seeds).

Runs are grouped by their config without the seed (and without :data:`IGNORED_CONFIG_KEYS`),
and each group is reported as mean ± std over its seeds (sample std, ddof = 1). Accuracies are
shown in percent; values <= 1 are taken as fractions.
"""

from .build import build_report
from .curves import EPS_ATTACK_STAGES, SecurityCurve, security_curves, security_table
from .groups import IGNORED_CONFIG_KEYS, config_group_key, facet_groups, group_labels, group_runs
from .plots import band, make_plots, mean_curve, probe_curve, security_curve_plot
from .runs import (
    Run,
    collect,
    eval_robust_acc,
    flatten_config,
    load_eval_result,
    load_run,
    read_json,
)
from .stats import as_percent, mean_ci, mean_std
from .tables import eval_group_key, eval_table, run_table

__all__ = [
    "EPS_ATTACK_STAGES",
    "IGNORED_CONFIG_KEYS",
    "Run",
    "SecurityCurve",
    "as_percent",
    "band",
    "build_report",
    "collect",
    "config_group_key",
    "eval_group_key",
    "eval_robust_acc",
    "eval_table",
    "facet_groups",
    "flatten_config",
    "group_labels",
    "group_runs",
    "load_eval_result",
    "load_run",
    "make_plots",
    "mean_ci",
    "mean_curve",
    "mean_std",
    "probe_curve",
    "read_json",
    "run_table",
    "security_curve_plot",
    "security_table",
    "security_curves",
]
