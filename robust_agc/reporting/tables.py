"""Markdown tables of run groups and of evaluation results, mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .groups import IGNORED_CONFIG_KEYS, config_group_key, group_labels
from .runs import Run, eval_robust_acc, flatten_config
from .stats import mean_std

__all__ = ["eval_group_key", "eval_table", "run_table"]


def _run_row(label: str, runs: Sequence[Run]) -> str:
    """One table row: mean ± std over the group's seeds of the final-epoch metrics."""
    best_val = []
    for r in runs:
        _, ys = r.series("val_robust_acc")
        best_val.append(max(ys) if ys else None)
    ev = [eval_robust_acc(r.evals[-1]) if r.evals else None for r in runs]
    return (
        f"| {label} | {len(runs)} | "
        f"{mean_std([r.final('epoch') for r in runs], digits=0)} | "
        f"{mean_std([r.final('test_clean_acc') for r in runs], pct=True)} | "
        f"{mean_std([r.final('test_robust_acc') for r in runs], pct=True)} | "
        f"{mean_std(best_val, pct=True)} | "
        f"{mean_std([r.final('wall_time_s') for r in runs], digits=1)} | "
        f"{mean_std([r.final('grad_evals') for r in runs], digits=0)} | "
        f"{mean_std(ev, pct=True)} |"
    )


def run_table(groups: dict[str, list[Run]]) -> str:
    """Markdown table, one row per group, mean ± std over seeds of the final-epoch metrics.

    The last column is the robust accuracy of each run's last attached evaluation
    (:func:`~robust_agc.reporting.runs.eval_robust_acc`)."""
    labels = group_labels(groups)
    head = (
        "| config | seeds | epochs | test clean acc (%) | test robust acc (%) | "
        "best val robust acc (%) | wall time (s) | grad evals | eval robust acc (%) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = [_run_row(labels[key], runs) for key, runs in groups.items()]
    return head + "\n".join(rows) + "\n"


def eval_group_key(d: dict[str, Any]) -> str:
    """The group of an evaluation record: its model's config without the seed, and the threat
    model, radius, points and attacks (records of one group differ only in the seed)."""
    cfg = (d.get("model_info") or {}).get("config")
    base = flatten_config(cfg) if isinstance(cfg, dict) else {"file": d["_path"]}
    base.update(
        {
            "architecture": d.get("architecture"),
            "dataset": d.get("dataset"),
            "threat_model": d.get("threat_model"),
            "eps": d.get("eps"),
            "n_examples": d.get("n_examples"),
            "attacks": (d.get("attack_config") or {}).get("units"),
        }
    )
    return config_group_key(base, IGNORED_CONFIG_KEYS)


def eval_table(evals: Sequence[dict[str, Any]]) -> str:
    """Markdown table of evaluation results, grouped by model config without seed, mean ± std."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in evals:
        groups.setdefault(eval_group_key(d), []).append(d)
    head = (
        "| model | dataset | threat | eps | n | seeds | clean acc (%) | robust acc (%) | "
        "attacks | flags fired |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for ds in groups.values():
        d0 = ds[0]
        fired = sorted({k for d in ds for k, v in (d.get("flags") or {}).items() if v})
        units = (d0.get("attack_config") or {}).get("units") or []
        rows.append(
            f"| {d0.get('architecture') or Path(d0['_path']).stem} | {d0.get('dataset')} | "
            f"{d0.get('threat_model')} | {d0.get('eps')} | {d0.get('n_examples')} | {len(ds)} | "
            f"{mean_std([d.get('clean_acc') for d in ds], pct=True)} | "
            f"{mean_std([eval_robust_acc(d) for d in ds], pct=True)} | "
            f"{', '.join(units) or '-'} | {', '.join(fired) or 'none'} |"
        )
    return head + "\n".join(rows) + "\n"
