"""Run folders and evaluation result files -> records (:class:`Run`, result dicts).

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per epoch: ``epoch``,
``train_loss``, ``train_acc``, ``val_clean_acc``, ``val_robust_acc``, ``test_clean_acc``,
``test_robust_acc``, ``lr``, ``epoch_time_s``, ``wall_time_s``, ``images_per_s``, ``grad_evals``,
``agc_tau``, ``agc_coef``, ``density`` (a number or ``{layer: density}``), ``exploration_rate``,
``flops_ratio``; any may be absent) and ``summary.json``; evaluation JSONs found in the folder
(``eval*.json`` written by ``robust-agc eval``) are attached to the run. An evaluation result is
the JSON of :meth:`robust_agc.eval.EvalResult.to_dict`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "Run",
    "collect",
    "eval_robust_acc",
    "flatten_config",
    "load_eval_result",
    "load_run",
    "read_json",
]

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run: flattened config, per-epoch metrics, summary and attached evaluations."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        """The run's seed (None when not recorded)."""
        return self.config.get("seed")

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` for a numeric per-epoch field (epochs default to 1, 2, ...)."""
        xs, ys = [], []
        for i, row in enumerate(self.metrics):
            v = row.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(float(row.get("epoch", i + 1)))
                ys.append(float(v))
        return xs, ys

    def chain_offset(self, key: str) -> float:
        """What the run's sources cost before it started, in ``key``'s unit: a pipeline stage
        (``summary.json`` with a ``source`` block) counts its sources' ``cpu_time_s``,
        ``train_time_s`` and ``grad_evals`` (their ``*_total``); 0 for anything else."""
        src = self.summary.get("source")
        if key not in ("cpu_time_s", "train_time_s", "grad_evals") or not isinstance(src, dict):
            return 0.0
        v = src.get(f"{key}_total")
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

    def final(self, key: str) -> float | None:
        """Last recorded numeric value of ``key`` in the metrics, else in the summary."""
        _, ys = self.series(key)
        if ys:
            return ys[-1]
        v = self.summary.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def read_json(path: Path) -> Any:
    """Parse a JSON file; an unreadable or invalid file raises UserError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def eval_robust_acc(result: dict[str, Any]) -> float | None:
    """The robust accuracy of an evaluation record: its ``robust_acc`` field.

    ``robust_acc`` is the worst case over every stage that ran and is present in every record;
    ``autoattack_acc`` (RobustBench's name) exists only when AutoAttack ran and stops at that
    stage, so a later stage (e.g. ``square``) could only lower the first. The two agree whenever
    AutoAttack is the last stage. Records without ``robust_acc`` (other tools') fall back to
    ``autoattack_acc``. None when neither is a number.
    """
    v = result.get("robust_acc", result.get("autoattack_acc"))
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def load_eval_result(path: str | Path) -> dict[str, Any]:
    """Read an evaluation result JSON (must hold ``clean_acc``); ``_path`` is added."""
    path = Path(path)
    d = read_json(path)
    if not isinstance(d, dict) or "clean_acc" not in d:
        raise UserError(f"{path} is not an evaluation result (no clean_acc)")
    d["_path"] = str(path)
    return d


def _read_config(path: Path) -> dict[str, Any]:
    """The flattened ``config.yaml`` of a run folder, or ``{"run": path}`` (its own group)."""
    import yaml

    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        logger.warning("%s has no config.yaml: it forms its own group", path)
        return {"run": str(path)}
    try:
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {cfg_path}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path} does not hold a mapping")
    return flatten_config(raw)


def _read_metrics(met_path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a ``metrics.jsonl`` file (blank lines skipped)."""
    metrics = []
    for n, line in enumerate(met_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{met_path}:{n}: invalid JSON ({e})") from None
        if isinstance(row, dict):
            metrics.append(row)
    return metrics


def load_run(path: str | Path) -> Run:
    """Read a run folder (``config.yaml``, ``metrics.jsonl``, optional ``summary.json``, ``eval*.json``)."""
    path = Path(path)
    met_path = path / "metrics.jsonl"
    if not met_path.is_file():
        raise UserError(f"{path} is not a run folder (no metrics.jsonl)")
    config = _read_config(path)
    metrics = _read_metrics(met_path)
    summary = {}
    if (path / "summary.json").is_file():
        s = read_json(path / "summary.json")
        summary = s if isinstance(s, dict) else {}
    evals = []
    for p in sorted(path.glob("eval*.json")):
        try:
            evals.append(load_eval_result(p))
        except UserError as e:
            logger.warning("skipping %s: %s", p, e)
    return Run(path=path, config=config, metrics=metrics, summary=summary, evals=evals)


def collect(paths: Iterable[str | Path]) -> tuple[list[Run], list[dict[str, Any]]]:
    """Sort inputs into runs and standalone evaluation results (folders searched 2 levels deep)."""
    runs: list[Run] = []
    evals: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if p.is_file():
            evals.append(load_eval_result(p))
        elif p.is_dir():
            if (p / "metrics.jsonl").is_file():
                runs.append(load_run(p))
                continue
            found = sorted(
                {m.parent for m in (*p.glob("*/metrics.jsonl"), *p.glob("*/*/metrics.jsonl"))}
            )
            if not found:
                raise UserError(f"{p} holds no run folder (metrics.jsonl) and is not a result file")
            runs.extend(load_run(f) for f in found)
        else:
            raise UserError(f"no such file or folder: {p}")
    return runs, evals
