"""The run folder: where a run lives, what it writes, and the checks before resuming it.

- ``config.yaml``: the resolved :class:`~robust_agc.config.TrainConfig` plus the model metadata;
- ``metrics.jsonl``: one JSON object per epoch (see :data:`METRIC_FIELDS`);
- ``last.pt`` / ``best.pt``: checkpoints (best = highest validation robust accuracy);
- ``summary.json``: final metrics, totals, versions and the machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_bytes
from ..config import EXECUTION_KEYS, TrainConfig
from ..errors import UserError

__all__ = [
    "METRIC_FIELDS",
    "RESUME_IGNORED_KEYS",
    "TIMING_FIELDS",
    "check_resume_config",
    "default_run_dir",
    "prepare_run_dir",
    "run_dir_of",
    "write_config",
    "write_metrics",
    "write_summary",
]

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_clean_acc",
    "val_robust_acc",
    "test_clean_acc",
    "test_robust_acc",
    "lr",
    "epoch_time_s",
    "wall_time_s",
    "train_time_s",
    "cpu_time_s",
    "images_per_s",
    "grad_evals",
)
"""Fields every epoch's record has; AGC adds ``agc_*`` fields, sparse methods ``density`` etc."""

TIMING_FIELDS = (
    "epoch_time_s",
    "wall_time_s",
    "train_time_s",
    "cpu_time_s",
    "images_per_s",
    "refresh_time_s",
)
"""Fields that measure time and therefore differ between otherwise identical runs."""

RESUME_IGNORED_KEYS = EXECUTION_KEYS
"""Config keys that may differ between a run and its resumption (where and how it executes:
:data:`robust_agc.config.EXECUTION_KEYS`)."""


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-<sparse>[-<sparsity>]-<optimizer>-<objective>-s<seed>``."""
    sparse = (
        cfg.sparse_method
        if cfg.sparse_method == "dense"
        else f"{cfg.sparse_method}{cfg.sparsity:g}"
    )
    return (
        Path("runs")
        / f"{cfg.dataset}-{cfg.model}-{sparse}-{cfg.optimizer}-{cfg.objective}-s{cfg.seed}"
    )


def run_dir_of(cfg: TrainConfig) -> Path:
    """The run folder of ``cfg``: ``--out``, else :func:`default_run_dir`."""
    return Path(cfg.out) if cfg.out else default_run_dir(cfg)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Check and create the run folder: it must hold ``last.pt`` with ``--resume``, and be empty
    or (``--overwrite``) a previous run folder, which is then removed."""
    out = run_dir_of(cfg)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if cfg.resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"nothing to resume: {out / 'last.pt'} does not exist")
        return out
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"run folder {out} exists and is not empty: pass --resume to continue it or --overwrite to replace it"
            )
        if not (out / "config.yaml").is_file():
            raise UserError(
                f"refusing to overwrite {out}: it is not a robust_agc run folder (no config.yaml)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_resume_config(cfg: TrainConfig, ckpt: dict[str, Any]) -> None:
    """A :class:`UserError` when the checkpoint's config differs from ``cfg`` in a key that
    matters (anything but :data:`RESUME_IGNORED_KEYS`)."""
    mine = cfg.to_dict()
    saved = {k: v for k, v in ckpt.get("config", {}).items() if k in mine}
    diff = sorted(k for k in saved if k not in RESUME_IGNORED_KEYS and saved[k] != mine[k])
    if diff:
        raise UserError(
            f"--resume with a different configuration ({', '.join(diff)}); use a new --out"
        )


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Write ``config.yaml`` (atomically)."""
    atomic_write_bytes(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())


def write_metrics(out_dir: Path, metrics: list[dict[str, Any]]) -> None:
    """Write ``metrics.jsonl``, one sorted-key JSON object per epoch (atomically)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in metrics)
    atomic_write_bytes(out_dir / "metrics.jsonl", text.encode())


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (atomically)."""
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
