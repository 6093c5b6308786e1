"""Runs -> groups of seeds: one group per configuration without the seed (and without the
settings that do not change what a run computes), its label and its facets."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import EXECUTION_KEYS
from ..errors import UserError
from .runs import Run

__all__ = [
    "IGNORED_CONFIG_KEYS",
    "cell_labels",
    "config_group_key",
    "facet_groups",
    "group_labels",
    "group_runs",
    "study_cell",
]

IGNORED_CONFIG_KEYS: frozenset[str] = EXECUTION_KEYS | frozenset(
    # the seed (what a group averages over), and output names other tools write in a config
    {"seed", "config", "name", "out_dir", "output_dir", "run_dir", "run_name"}
)
"""Config keys that do not separate groups: :data:`robust_agc.config.EXECUTION_KEYS` (where and
how a run executes), the seed, and output names. Also matched as the last part of a dotted key."""

_SEED_DIR = re.compile(r"s\d+")


def study_cell(path: Path) -> tuple[str, str] | None:
    """``(study, cell)`` of a run folder stored in run_study's layout ``<study>/<cell>/s<seed>``;
    ``None`` for any other folder."""
    if not _SEED_DIR.fullmatch(path.name):
        return None
    return path.parent.parent.name, path.parent.name


def config_group_key(config: dict[str, Any], ignore: frozenset[str] = IGNORED_CONFIG_KEYS) -> str:
    """Canonical JSON of ``config`` without the ``ignore`` keys: equal keys = one group."""
    kept = {
        k: v for k, v in config.items() if k not in ignore and k.rsplit(".", 1)[-1] not in ignore
    }
    return json.dumps(kept, sort_keys=True, default=str)


def group_runs(
    runs: Sequence[Run], ignore: frozenset[str] = IGNORED_CONFIG_KEYS
) -> dict[str, list[Run]]:
    """Group runs whose configs agree on everything but ``ignore`` keys (the seed...).

    Runs stored in run_study's layout ``<study>/<cell>/s<seed>`` are grouped by their cell
    instead, the study's own definition of a group: a pipeline stage's config names its source
    checkpoint, a path that differs per seed, so the config alone would make one group per
    seed. The key is then the config of the cell's first run plus a ``"cell"`` entry."""
    cells: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        where = study_cell(r.path)
        if where is None:
            cells = {}
            break
        cells.setdefault(where, []).append(r)
    if cells:
        keyed = {
            json.dumps(
                {**json.loads(config_group_key(rs[0].config, ignore)), "cell": f"{st}/{cell}"},
                sort_keys=True,
                default=str,
            ): rs
            for (st, cell), rs in cells.items()
        }
        if len(keyed) == len(cells):
            return keyed
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(config_group_key(r.config, ignore), []).append(r)
    return groups


def cell_labels(dirs: dict[str, Sequence[Path]]) -> dict[str, str] | None:
    """The study cell of each group of run folders when they are stored as
    ``<study>/<cell>/s<seed>`` (run_study's layout) and every group is exactly one cell: the cell's
    name, or ``<study>/<cell>`` when several studies share cell names; else None."""
    names: dict[str, tuple[str, str]] = {}
    for k, paths in dirs.items():
        cell = study_cell(paths[0]) if paths else None
        if cell is None or any(study_cell(p) != cell for p in paths):
            return None
        names[k] = cell
    if len(set(names.values())) != len(names):
        return None
    if len({cell for _, cell in names.values()}) == len(names):
        return {k: cell for k, (_, cell) in names.items()}
    return {k: f"{study}/{cell}" for k, (study, cell) in names.items()}


def group_labels(groups: dict[str, list[Run]]) -> dict[str, str]:
    """Short label per group: its study cell name (``<cell>/s<seed>`` layout), else the config
    keys that differ between groups."""
    cells = cell_labels({k: [r.path for r in runs] for k, runs in groups.items()})
    if cells is not None:
        return cells
    cfgs = {k: json.loads(k) for k in groups}
    keys = sorted({kk for c in cfgs.values() for kk in c})
    differing = [
        k for k in keys if len({json.dumps(c.get(k), default=str) for c in cfgs.values()}) > 1
    ]
    if not differing:
        differing = [k for k in ("model", "sparse_method", "sparsity", "optimizer") if k in keys]
    out = {}
    for k, c in cfgs.items():
        label = ", ".join(f"{d}={c.get(d)}" for d in differing if d in c)
        out[k] = label or groups[k][0].path.name
    return out


def facet_groups(
    groups: dict[str, list[Run]], facet: Sequence[str]
) -> list[tuple[str, dict[str, list[Run]]]]:
    """Split ``groups`` by the values of the ``facet`` config keys (order of first appearance);
    one facet titled ``""`` when ``facet`` is empty."""
    if not facet:
        return [("", groups)]
    out: dict[str, dict[str, list[Run]]] = {}
    for key, runs in groups.items():
        cfg = json.loads(key)
        for k in facet:
            if k not in cfg:
                raise UserError(f"--facet: no config key {k!r} in the runs (e.g. sparse_method)")
        title = ", ".join(f"{k}={cfg[k]}" for k in facet)
        out.setdefault(title, {})[key] = runs
    return list(out.items())
