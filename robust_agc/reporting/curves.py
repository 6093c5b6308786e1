"""Security curves of evaluation records (the ``fmn`` block of an evaluation record,
:meth:`robust_agc.eval.EvalResult.to_dict`): one curve per model, averaged over its seeds, with
the eps-attack's point, and their markdown table. :func:`~robust_agc.reporting.plots.security_curve_plot` draws them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .groups import IGNORED_CONFIG_KEYS, cell_labels
from .runs import flatten_config
from .tables import eval_group_key

__all__ = ["EPS_ATTACK_STAGES", "SecurityCurve", "security_curves", "security_table"]


EPS_ATTACK_STAGES: tuple[str, ...] = ("pgd", "autoattack", "square")
"""The record's stages that attack at the evaluation's eps (the point marked on a curve)."""
_METHOD_KEYS = ("sparse_method", "sparsity", "optimizer", "objective")


@dataclass(frozen=True)
class SecurityCurve:
    """One model's security curve: the mean over its records (seeds) of the ``fmn`` block's
    ``security_curve``, and the eps-attack point.

    Attributes:
        label: the legend entry (the config keys that differ between models, or the file name).
        dataset, threat_model: the panel the curve is drawn in.
        eps_grid: the radii; ``robust_acc`` and ``std`` the mean and sample std (0 for one record)
            of the robust accuracy at each, fractions in [0, 1].
        eps: the records' evaluation radius.
        eps_attack: the last stage that attacked at eps (``"autoattack"``, ``"pgd"``, ``"square"``)
            or None; ``eps_attack_acc`` the mean of its cumulative robust accuracy (the worst
            case up to that stage, without FMN), None when no eps-attack ran.
        paths: the record files averaged.
        disagree: the mean over the records of the points broken at eps by FMN only
            (``"fmn_only"``: its radius <= eps, the eps-attack missed them) and by the eps-attack
            only (``"eps_attack_only"``); None when a record has no such count.
    """

    label: str
    dataset: str | None
    threat_model: str | None
    eps_grid: tuple[float, ...]
    robust_acc: tuple[float, ...]
    std: tuple[float, ...]
    eps: float | None
    eps_attack: str | None
    eps_attack_acc: float | None
    paths: tuple[str, ...]
    disagree: dict[str, float] | None = None


def _record_curve(d: dict[str, Any]) -> list[tuple[float, float]] | None:
    curve = (d.get("fmn") or {}).get("security_curve")
    if not curve:
        return None
    return [(float(e), float(a)) for e, a in curve]


def _eps_attack(d: dict[str, Any]) -> tuple[str | None, float | None]:
    """The last eps-attack stage of a record and its cumulative robust accuracy."""
    found: tuple[str | None, float | None] = (None, None)
    for st in d.get("stages") or []:
        if st.get("name") in EPS_ATTACK_STAGES:
            found = (st["name"], float(st["robust_acc"]))
    return found


def _mean_disagreement(ds: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """The mean of the records' ``fmn.n_disagree`` counts; None unless every record has them."""
    counts = [(d.get("fmn") or {}).get("n_disagree") for d in ds]
    if not counts or not all(isinstance(c, dict) for c in counts):
        return None
    keys = ("fmn_only", "eps_attack_only")
    return {k: statistics.fmean(float(c.get(k, 0)) for c in counts) for k in keys}


def _curve_labels(groups: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Per group, its study cell when the records lie in run_study's ``<cell>/s<seed>`` folders
    (:func:`~robust_agc.reporting.groups.cell_labels`), else the model config keys whose values
    differ between groups (the method keys when only one group; never
    :data:`~robust_agc.reporting.groups.IGNORED_CONFIG_KEYS`), else the architecture or the first
    record's file name."""
    cells = cell_labels({k: [Path(d["_path"]).parent for d in ds] for k, ds in groups.items()})
    if cells is not None:
        return cells
    cfgs = {
        k: flatten_config((ds[0].get("model_info") or {}).get("config") or {})
        for k, ds in groups.items()
    }
    keys = sorted(
        {kk for c in cfgs.values() for kk in c if kk.rsplit(".", 1)[-1] not in IGNORED_CONFIG_KEYS}
    )
    differing = [k for k in keys if len({repr(c.get(k)) for c in cfgs.values()}) > 1]
    if not differing:
        differing = [k for k in _METHOD_KEYS if k in keys]
    labels = {}
    for k, ds in groups.items():
        label = ", ".join(f"{d}={cfgs[k][d]}" for d in differing if d in cfgs[k])
        labels[k] = label or ds[0].get("architecture") or Path(ds[0]["_path"]).stem
    counts: dict[str, int] = {}
    for v in labels.values():
        counts[v] = counts.get(v, 0) + 1
    return {  # still ambiguous (e.g. no config): add the file name
        k: v if counts[v] == 1 else f"{v} ({Path(groups[k][0]['_path']).stem})"
        for k, v in labels.items()
    }


def security_curves(evals: Sequence[dict[str, Any]]) -> list[SecurityCurve]:
    """The security curves of evaluation records (those with an ``fmn`` security curve).

    Records of one model (same config but the seed, same threat model, radius, points, attacks
    and grid: :func:`~robust_agc.reporting.tables.eval_group_key`) are averaged into one curve;
    each record needs ``_path`` (as :func:`~robust_agc.reporting.runs.load_eval_result` adds).
    Returns one :class:`SecurityCurve` per model, in order of first appearance.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in evals:
        curve = _record_curve(d)
        if curve is not None:
            key = eval_group_key(d) + repr([e for e, _ in curve])
            groups.setdefault(key, []).append(d)
    labels = _curve_labels(groups)
    out = []
    for key, ds in groups.items():
        accs = [[a for _, a in _record_curve(d) or []] for d in ds]
        points = [_eps_attack(d) for d in ds]
        att_accs = [a for _, a in points if a is not None]
        out.append(
            SecurityCurve(
                label=labels[key],
                dataset=ds[0].get("dataset"),
                threat_model=ds[0].get("threat_model"),
                eps_grid=tuple(e for e, _ in _record_curve(ds[0]) or []),
                robust_acc=tuple(statistics.fmean(col) for col in zip(*accs)),
                std=tuple(statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*accs)),
                eps=ds[0].get("eps"),
                eps_attack=points[0][0],
                eps_attack_acc=statistics.fmean(att_accs) if len(att_accs) == len(ds) else None,
                paths=tuple(str(d["_path"]) for d in ds),
                disagree=_mean_disagreement(ds),
            )
        )
    return out


def security_table(curves: Sequence[SecurityCurve]) -> str:
    """Markdown table of security curves (:func:`~robust_agc.reporting.plots.security_curves`):
    per model, the records averaged, the radius, the curve's robust accuracy at eps (worst case
    over every stage, FMN included; ``-`` when eps is not on the grid), the eps-attack's, the
    points each of the two broke at eps and the other did not (mean over records), and the grid's
    range."""
    head = (
        "| model | dataset | threat | records | eps | curve at eps (%) | eps-attack at eps (%) | "
        "broken at eps by FMN only / eps-attack only (points) | grid |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for c in curves:
        at_eps = dict(zip(c.eps_grid, c.robust_acc)).get(c.eps) if c.eps is not None else None
        attack = (
            f"{100 * c.eps_attack_acc:.2f} ({c.eps_attack})"
            if c.eps_attack_acc is not None
            else "-"
        )
        split = (
            f"{c.disagree['fmn_only']:g} / {c.disagree['eps_attack_only']:g}"
            if c.disagree is not None and c.eps_attack is not None
            else "-"
        )
        rows.append(
            f"| {c.label} | {c.dataset} | {c.threat_model} | {len(c.paths)} | {c.eps} | "
            f"{'-' if at_eps is None else f'{100 * at_eps:.2f}'} | {attack} | {split} | "
            f"{c.eps_grid[0]:g} to {c.eps_grid[-1]:g} ({len(c.eps_grid)} radii) |"
        )
    return head + "\n".join(rows) + "\n"
