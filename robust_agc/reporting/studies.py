"""Study files: a grid of training configurations x seeds, parsed into :class:`Study` and
expanded into one :class:`RunSpec` per run.

Shared by the study driver (``experiments/run_study.py``, which trains and evaluates the runs) and
the study tables (``experiments/summarize.py``); the file format is described in the driver's
docstring and in ``experiments/README.md``. A grid value may carry a ``pipeline`` (see
:data:`PIPELINE_KEYS`): its cell is then a pruning pipeline (:func:`robust_agc.prune.prune`)
started from the best checkpoint of another cell's run of the same seed, and the cell's settings
are the pipeline stages' settings. Where runs and results live is the caller's choice
(``runs_root``, ``results_root``): a run of cell ``c`` and seed ``s`` of study ``n`` is
``<root>/<n>/<c>/s<s>``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import EXECUTION_KEYS, TrainConfig
from ..errors import UserError

__all__ = [
    "DEFAULT_THREADS",
    "EVAL_DEFAULTS",
    "PIPELINE_KEYS",
    "STUDY_KEYS",
    "TARGET_METRICS",
    "SPEED_DEFAULTS",
    "SPEED_FILE",
    "RunSpec",
    "Study",
    "expand",
    "extra_eval_file",
    "load_study",
    "source_spec",
]

DEFAULT_THREADS = 1
TARGET_METRICS = ("val_robust_acc", "val_clean_acc")  # what the baseline's target is set on
EVAL_DEFAULTS: dict[str, Any] = {
    "checkpoint": "best.pt",
    "attacks": "clean,pgd",
    "n_examples": 500,
    "eps": None,  # None: the checkpoint's training eps
    "pgd_steps": 50,
    "pgd_restarts": 1,
    "batch_size": 250,
    "seed": 0,
    "version": "standard",  # AutoAttack version, used when attacks has autoattack
    "fmn_steps": 1000,  # used when attacks has fmn
    "eps_grid": None,  # fmn's security-curve grid (a list); None: the harness's default
}
SPEED_DEFAULTS: dict[str, Any] = {
    "cells": None,  # glob patterns of the cells measured; None: every cell
    "batch_size": 128,
    "repeats": 30,
    "warmup": 5,
}
"""Options of a study's ``speed`` entry (:func:`robust_agc.cli.export.measure_export_speed`)."""
SPEED_FILE = "speed.json"  # a run's speed record (run folder and stored results)
STUDY_KEYS = frozenset(
    {"study", "description", "base", "grid", "seeds", "eval", "baseline", "exclude"}
    | {"extra_evals", "reuse", "speed"}
)

PIPELINE_KEYS: dict[str, str] = {
    "method": "lwm, hydra or imp (robust_agc.prune.METHODS)",
    "source_cell": "the cell (of this study) whose run of the same seed is pruned (its best.pt)",
    "rounds": "imp: pruning rounds (default 3)",
    "score_epochs": "hydra: epochs of score training (default: the cell's epochs)",
    "rewind_epoch": "imp: rewind to the source run's epoch<K>.pt (the source needs save_epochs)",
}
"""Keys of a grid value's ``pipeline`` mapping (``method`` and ``source_cell`` are required)."""
_PIPELINE_SET = ("init_from", "prune", "rewind_from")  # set by robust_agc.prune, per stage

_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
Axes = dict[str, list[tuple[str, dict[str, Any]]]]  # axis -> [(label, settings)]


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    name: str
    base: dict[str, Any]
    axes: Axes
    seeds: list[int]
    eval: dict[str, Any] | None
    baseline: dict[str, str] | None  # {"axis": ..., "value": label, "metric": ...}
    description: str = ""
    exclude: tuple[dict[str, frozenset[str]], ...] = ()
    extra_evals: tuple[dict[str, Any], ...] = ()  # each: name, seeds (None: all), eval options
    reuse: tuple[str, ...] = ()
    speed: dict[str, Any] | None = None  # SPEED_DEFAULTS keys; None: no speed records

    def measures_speed(self, cell: str) -> bool:
        """Whether the runs of ``cell`` get a speed record (``speed.json``): the study has a
        ``speed`` entry whose ``cells`` patterns (none: every cell) match it."""
        if self.speed is None:
            return False
        globs = self.speed.get("cells")
        return globs is None or any(fnmatch.fnmatchcase(cell, g) for g in globs)

    def extra_evals_for(self, seed: int, cell: str | None = None) -> list[dict[str, Any]]:
        """The extra evaluations that apply to runs of this seed (and, given, of this cell: an
        entry with ``cells`` applies to the cells matching one of its glob patterns)."""
        return [
            e
            for e in self.extra_evals
            if (e["seeds"] is None or seed in e["seeds"])
            and (
                cell is None
                or e.get("cells") is None
                or any(fnmatch.fnmatchcase(cell, g) for g in e["cells"])
            )
        ]


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its cell, seed, full settings and folders."""

    study: str
    cell: str
    labels: dict[str, str]  # axis -> label of this cell
    seed: int
    settings: dict[str, Any]  # TrainConfig keyword arguments (without out/threads/...)
    run_dir: Path
    result_dir: Path
    pipeline: dict[str, Any] | None = None  # a pruning pipeline cell (PIPELINE_KEYS)

    def config(self, threads: int | None = DEFAULT_THREADS, **extra: Any) -> TrainConfig:
        """The validated TrainConfig of this run (``out`` = the run folder)."""
        cfg = TrainConfig(
            **{**self.settings, "out": str(self.run_dir), "threads": threads, **extra}
        )
        cfg.validate()
        return cfg


def _check_keys(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Study settings -> TrainConfig keys; execution keys and the seed belong to the driver."""
    out = {}
    for k, v in settings.items():
        key = str(k).replace("-", "_")
        if key not in _TRAIN_KEYS:
            raise UserError(f"unknown setting {k!r} in {where}")
        if key in EXECUTION_KEYS or key == "seed":
            raise UserError(f"setting {k!r} in {where} is chosen by the driver, not the study")
        out[key] = v
    return out


def _parse_axis(axis: Any, values: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """One grid axis -> ``[(label, settings)]`` (labels are folder names, unique)."""
    if not isinstance(values, list) or not values:
        raise UserError(f"Invalid grid value: axis {axis!r} needs a non-empty list")
    entries: list[tuple[str, dict[str, Any]]] = []
    for v in values:
        if isinstance(v, dict):
            if "name" not in v:
                raise UserError(f"Invalid grid value: {v!r} in axis {axis!r} has no name")
            label = str(v["name"])
            settings = _check_keys(
                {k: x for k, x in v.items() if k not in ("name", "pipeline")},
                f"{where}: grid.{axis}",
            )
            if "pipeline" in v:
                settings["pipeline"] = _parse_pipeline(v["pipeline"], label)
        else:
            label = f"{axis}{v}"
            settings = _check_keys({axis: v}, f"{where}: grid.{axis}")
        if any(c in label for c in "/\\ ") or label in ("", ".", ".."):
            raise UserError(f"Invalid grid value: label {label!r} is not a folder name")
        entries.append((label, settings))
    labels = [lab for lab, _ in entries]
    if len(set(labels)) != len(labels):
        raise UserError(f"Invalid grid value: duplicate labels in axis {axis!r}: {labels}")
    return entries


def _parse_pipeline(p: Any, label: str) -> dict[str, Any]:
    """A grid value's ``pipeline`` mapping, checked (the source cell is checked on expansion)."""
    from ..prune.pipeline import METHODS

    keys = ", ".join(PIPELINE_KEYS)
    if (
        not isinstance(p, dict)
        or set(p) - set(PIPELINE_KEYS)
        or not {"method", "source_cell"} <= set(p)
    ):
        raise UserError(
            f"Invalid pipeline value: {p!r} in {label!r} (keys: {keys}; method and source_cell required)"
        )
    if p["method"] not in METHODS:
        raise UserError(
            f"Invalid pipeline value: method {p['method']!r} (choose from {', '.join(METHODS)})"
        )
    for key, low in (("rounds", 1), ("score_epochs", 1), ("rewind_epoch", 0)):
        v = p.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise UserError(f"Invalid pipeline value: {key} {v!r} (an integer >= {low})")
    return {
        "rounds": None,
        "score_epochs": None,
        "rewind_epoch": None,
        **p,
        "source_cell": str(p["source_cell"]),
    }


def _parse_grid(grid: Any, where: str) -> Axes:
    if not isinstance(grid, dict):
        raise UserError(f"Invalid grid value: {grid!r} (a mapping axis -> list of values)")
    return {str(axis): _parse_axis(axis, values, where) for axis, values in grid.items()}


def _parse_seeds(seeds: Any) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise UserError(f"Invalid seeds value: {seeds!r} (a list of distinct integers)")
    return list(seeds)


def _parse_eval(ev: Any) -> dict[str, Any] | None:
    if ev is None:
        return None
    if not isinstance(ev, dict) or set(ev) - set(EVAL_DEFAULTS):
        raise UserError(f"Invalid eval value: {ev!r} (keys: {', '.join(EVAL_DEFAULTS)})")
    return {**EVAL_DEFAULTS, **ev}


def _parse_baseline(bl: Any, axes: Axes) -> dict[str, str] | None:
    """``{axis, value, metric}`` with ``value`` one of the axis' labels (a scalar axis value
    ``v`` may be given for its label ``<axis><v>``)."""
    if bl is None:
        return None
    if (
        not isinstance(bl, dict)
        or not {"axis", "value"} <= set(bl) <= {"axis", "value", "metric"}
        or bl.get("metric", "val_robust_acc") not in TARGET_METRICS
        or bl["axis"] not in axes
        or str(bl["value"]) not in [lab for lab, _ in axes[bl["axis"]]]
        and f"{bl['axis']}{bl['value']}" not in [lab for lab, _ in axes[bl["axis"]]]
    ):
        raise UserError(
            f"Invalid baseline value: {bl!r} (axis: a grid axis, value: one of its labels, "
            f"optional metric: {', '.join(TARGET_METRICS)})"
        )
    value = str(bl["value"])
    if value not in [lab for lab, _ in axes[bl["axis"]]]:
        value = f"{bl['axis']}{bl['value']}"
    return {
        "axis": str(bl["axis"]),
        "value": value,
        "metric": str(bl.get("metric", "val_robust_acc")),
    }


def _parse_exclude(rules: Any, axes: Axes) -> tuple[dict[str, frozenset[str]], ...]:
    if rules is None:
        return ()
    if not isinstance(rules, list):
        raise UserError(f"Invalid exclude value: {rules!r} (a list of {{axis: labels}} rules)")
    out = []
    for rule in rules:
        if not isinstance(rule, dict) or not rule:
            raise UserError(f"Invalid exclude value: {rule!r} (a mapping axis -> labels)")
        parsed: dict[str, frozenset[str]] = {}
        for axis, labels in rule.items():
            labels = labels if isinstance(labels, list) else [labels]
            known = [lab for lab, _ in axes.get(str(axis), [])]
            bad = [str(x) for x in labels if str(x) not in known]
            if str(axis) not in axes or bad or not labels:
                raise UserError(
                    f"Invalid exclude value: {rule!r} (axis {axis!r} has labels {known})"
                )
            parsed[str(axis)] = frozenset(str(x) for x in labels)
        out.append(parsed)
    return tuple(out)


def _parse_extra_evals(entries: Any, ev: dict[str, Any] | None) -> tuple[dict[str, Any], ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list) or ev is None:
        raise UserError(
            f"Invalid extra_evals value: {entries!r} (a list of evaluations; needs an eval)"
        )
    out, names = [], set()
    for e in entries:
        allowed = set(EVAL_DEFAULTS) | {"name", "seeds", "cells"}
        if not isinstance(e, dict) or set(e) - allowed or "name" not in e:
            raise UserError(
                f"Invalid extra_evals value: {e!r} (keys: name, seeds, cells, "
                f"{', '.join(EVAL_DEFAULTS)})"
            )
        cells = e.get("cells")
        if cells is not None and (
            not isinstance(cells, list) or not cells or not all(isinstance(c, str) for c in cells)
        ):
            raise UserError(
                f"Invalid extra_evals value: cells {cells!r} (a list of cell-name glob patterns)"
            )
        name = str(e["name"])
        if not name.replace("-", "").replace("_", "").isalnum() or name in names:
            raise UserError(f"Invalid extra_evals value: name {name!r} (unique, [A-Za-z0-9_-])")
        names.add(name)
        seeds = e.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds)
        ):
            raise UserError(f"Invalid extra_evals value: seeds {seeds!r} (a list of integers)")
        out.append(
            {**ev, "cells": None, **{k: v for k, v in e.items() if k != "name"}, "name": name}
        )
    return tuple(out)


def _parse_reuse(reuse: Any) -> tuple[str, ...]:
    """Names of other studies whose identical stored runs are copied (with their extra
    evaluations when the other study made them with the same options; a missing one is added
    by rebuilding the run, as for a run of this study)."""
    reuse = reuse or []
    if not isinstance(reuse, list) or not all(isinstance(r, str) and r for r in reuse):
        raise UserError(f"Invalid reuse value: {reuse!r} (a list of study names)")
    return tuple(reuse)


def _parse_speed(speed: Any) -> dict[str, Any] | None:
    """A study's ``speed`` entry: which cells' runs get a ``speed.json`` (their evaluated
    checkpoint exported and timed against its full-width architecture) and the timing options."""
    if speed is None:
        return None
    if not isinstance(speed, dict) or set(speed) - set(SPEED_DEFAULTS):
        raise UserError(f"Invalid speed value: {speed!r} (keys: {', '.join(SPEED_DEFAULTS)})")
    out = {**SPEED_DEFAULTS, **speed}
    cells = out["cells"]
    if cells is not None and (
        not isinstance(cells, list) or not cells or not all(isinstance(c, str) for c in cells)
    ):
        raise UserError(f"Invalid speed value: cells {cells!r} (a list of cell-name glob patterns)")
    for key, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"Invalid speed value: {key} {v!r} (an integer >= {low})")
    return out


def _read_study_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping")
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in {path}")
    return data


def load_study(path: str | Path, *, runs_root: Path, results_root: Path) -> Study:
    """Parse and validate a study YAML file; every run's configuration is validated now (not
    hours later), which is why the roots are needed."""
    path = Path(path)
    data = _read_study_file(path)
    name = str(data.get("study") or path.stem)
    base = _check_keys(data.get("base") or {}, f"{path}: base")
    axes = _parse_grid(data.get("grid") or {}, str(path))
    seeds = _parse_seeds(data.get("seeds", [0]))
    ev = _parse_eval(data.get("eval"))
    baseline = _parse_baseline(data.get("baseline"), axes)
    exclude = _parse_exclude(data.get("exclude"), axes)
    extra = _parse_extra_evals(data.get("extra_evals"), ev)
    reuse = _parse_reuse(data.get("reuse"))
    speed = _parse_speed(data.get("speed"))
    if speed is not None and ev is None:
        raise UserError("Invalid speed value: a speed record needs an eval (its checkpoint)")
    study = Study(
        name=name,
        base=base,
        axes=axes,
        seeds=seeds,
        eval=ev,
        baseline=baseline,
        description=str(data.get("description") or ""),
        exclude=exclude,
        extra_evals=extra,
        reuse=reuse,
        speed=speed,
    )
    specs = expand(study, runs_root=runs_root, results_root=results_root)
    for spec in specs:
        spec.config()
        if spec.pipeline is not None:
            _check_pipeline_cell(spec, source_spec(study, spec, specs))
    return study


def _check_pipeline_cell(spec: RunSpec, source: RunSpec) -> None:
    clash = [k for k in _PIPELINE_SET if spec.settings.get(k) is not None]
    if clash:
        raise UserError(
            f"Invalid pipeline value: cell {spec.cell!r} sets {clash[0]!r}, which the pipeline sets"
        )
    k = spec.pipeline["rewind_epoch"] if spec.pipeline else None
    if k is not None and k not in (source.config().save_epochs or ()):
        raise UserError(
            f"Invalid pipeline value: rewind_epoch {k} of {spec.cell!r} needs save_epochs [{k}] "
            f"in its source cell {source.cell!r}"
        )


def extra_eval_file(extra: dict[str, Any]) -> str:
    """The file name of an extra evaluation's result (``eval_<name>.json``)."""
    return f"eval_{extra['name']}.json"


def _excluded(study: Study, labels: dict[str, str]) -> bool:
    return any(all(labels[a] in labs for a, labs in rule.items()) for rule in study.exclude)


def _cells(study: Study) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """``(cell name, labels, settings)`` of every cell not excluded, in grid order."""
    axis_names = list(study.axes)
    cells: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    for combo in itertools.product(*(study.axes[a] for a in axis_names)):
        settings = dict(study.base)
        labels: dict[str, str] = {}
        for axis, (label, s) in zip(axis_names, combo):
            settings.update(s)
            labels[axis] = label
        if _excluded(study, labels):
            continue
        given = [s for _, s in combo if "pipeline" in s]
        if len(given) > 1:
            raise UserError(f"Invalid pipeline value: two axes give cell {labels} a pipeline")
        cells.append(("_".join(labels.values()) or "base", labels, settings))
    return cells


def expand(study: Study, *, runs_root: Path, results_root: Path) -> list[RunSpec]:
    """All runs of the study, seed-major (every cell's seed 0 first, then seed 1, ...)."""
    cells = _cells(study)
    return [
        RunSpec(
            study=study.name,
            cell=cell,
            labels=labels,
            seed=seed,
            settings={k: v for k, v in settings.items() if k != "pipeline"} | {"seed": seed},
            run_dir=runs_root / study.name / cell / f"s{seed}",
            result_dir=results_root / study.name / cell / f"s{seed}",
            pipeline=settings.get("pipeline"),
        )
        for seed in study.seeds
        for cell, labels, settings in cells
    ]


def source_spec(study: Study, spec: RunSpec, specs: list[RunSpec] | None = None) -> RunSpec:
    """The run a pipeline cell's run starts from: its ``source_cell``'s run of the same seed
    (a cell of the study that is not itself a pipeline; UserError otherwise)."""
    if spec.pipeline is None:
        raise UserError(f"{spec.cell} is not a pipeline cell")
    name = spec.pipeline["source_cell"]
    root = spec.run_dir.parents[2]
    results = spec.result_dir.parents[2]
    for other in specs or expand(study, runs_root=root, results_root=results):
        if other.cell == name and other.seed == spec.seed:
            if other.pipeline is not None:
                raise UserError(
                    f"Invalid pipeline value: source_cell {name!r} of {spec.cell!r} is itself a "
                    "pipeline cell"
                )
            return other
    raise UserError(
        f"Invalid pipeline value: source_cell {name!r} of {spec.cell!r} is not a cell of "
        f"{study.name} (excluded, or misspelt)"
    )
