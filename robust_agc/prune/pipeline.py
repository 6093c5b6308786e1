"""Pruning pipelines: stages chained by checkpoints, each an ordinary training run folder.

``prune(source, method=..., sparsity=..., out=...)`` (``robust-agc prune SOURCE ...``) plans the
stages, checks the source and every stage's settings before writing anything, runs the stages
with :func:`robust_agc.train.train` (each in its own folder under ``out``, with its
``config.yaml``, ``metrics.jsonl``, ``last.pt``/``best.pt`` and ``summary.json``, whose
``source`` block names the checkpoint it started from and its SHA-256), and writes
``out/pipeline.json`` and the folded model ``out/model.pt``.

Stages (``S`` the target sparsity, ``E`` = ``--epochs``):

- ``lwm``: ``1-lwm``: the source's weights pruned once to ``S`` by ``|w|`` (``--prune lwm``),
  then ``E`` epochs of training with the mask fixed (``--sparse-method static`` by default);
- ``hydra``: ``1-scores``: HYDRA's score training at ``S`` (``--prune hydra``, weights frozen,
  ``--score-epochs``, default ``E``), then ``2-finetune``: ``E`` epochs of the weights under the
  top-k of the trained scores (``--init-from 1-scores/best.pt --sparse-method static``);
- ``imp``: ``r-imp`` for ``r = 1..N`` (``--rounds N``): round ``r`` prunes the previous round's
  ``best.pt`` (the source for ``r = 1``) by ``|w|`` to density ``d_0 (d_S / d_0) ** (r / N)``
  (geometric; ``d_0`` the source's density, 1 when dense), optionally rewinds the weights to the
  source run's ``epoch<K>.pt`` (``--rewind-epoch K``; the source must have been trained with
  ``--save-epochs K``), and trains ``E`` epochs. The last round is exactly ``S``.

The stages' settings are the source run's configuration (sparse and pruning settings and where it
ran left out), overridden by the caller's; unless given, ``--sparse-init`` is ``uniform``
(HYDRA's per-layer density) and ``--sparse-method`` of the trained masks ``static``.
``--sparse-structure filter`` with ``lwm`` prunes whole filters of a dense source by their L1
norm (Li et al. 2017, :func:`~robust_agc.sparse.l1_filter_masks`), with ``hydra`` by filter
scores (:mod:`~robust_agc.prune.filter_scores`: a score per channel of each coupled group, gated
where the channel is read, then the selected filters fine-tuned); ``model.pt`` is then the folded
full-width network, and ``robust-agc export`` shrinks the stage's ``best.pt``. IMP is per weight
only.
``--resume`` continues an interrupted pipeline: finished stages are kept, the interrupted one
resumes from its ``last.pt`` (bit-identical on CPU), the rest run. Equal-compute accounting:
``pipeline.json`` sums every stage's ``grad_evals`` and training time, with and without the
source's own (``*_total``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes, checkpoint_widths, load_checkpoint, save_checkpoint
from ..config import DERIVED_KEYS, EXECUTION_KEYS, STRUCTURED_SOURCE_RULE, TrainConfig
from ..errors import UserError
from ..models import create_model
from ..sparse import fold_masks
from ..train import train
from .magnitude import imp_densities, register_masks
from .source import InitSource, file_sha256, load_source, preflight

__all__ = [
    "FOOTNOTE",
    "METHODS",
    "PIPELINE_FORMAT",
    "Stage",
    "export_model",
    "plan_stages",
    "prune",
]

METHODS: tuple[str, ...] = ("lwm", "hydra", "imp")
"""The pipelines of :func:`prune`."""

PIPELINE_FORMAT = "robust_agc.prune/1"
"""The ``format`` field of ``pipeline.json``."""

FOOTNOTE = "Compressed model"
"""RobustBench's footnote for pruned entries, carried by the record."""

_SET_BY_PIPELINE = ("init_from", "prune", "rewind_from")
_NOT_INHERITED = (
    EXECUTION_KEYS
    | DERIVED_KEYS
    | {"sparse_method", "sparsity", "sparse_init", "update_interval", "drop_fraction"}
    | {"update_end", "dense_first_layer", "prune_scope", "save_epochs", "sparse_structure"}
    | set(_SET_BY_PIPELINE)
    | {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("bsr_")}
)


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: its folder name, what it does, and its run's configuration."""

    name: str
    kind: str  # "lwm", "scores", "finetune" or "imp"
    cfg: TrainConfig


def _base_config(source: InitSource, overrides: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UserError(f"unknown setting {bad[0]!r}")
    clash = [k for k in _SET_BY_PIPELINE if overrides.get(k) is not None]
    if clash:
        raise UserError(f"--{clash[0].replace('_', '-')} is set by the pipeline, per stage")
    values = {k: v for k, v in source.config.items() if k in known and k not in _NOT_INHERITED}
    values.update({"sparse_init": "uniform", "sparse_method": "static"})
    values.update(overrides)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise UserError(str(e)) from None


def plan_stages(
    source: InitSource,
    *,
    method: str,
    sparsity: float,
    out: Path,
    rounds: int = 3,
    rewind_epoch: int | None = None,
    score_epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Stage]:
    """The stages of ``method`` (see the module docstring), their configurations validated."""
    if method not in METHODS:
        raise UserError(f"Invalid method value: {method!r} (choose from {', '.join(METHODS)})")
    base = _base_config(source, dict(overrides or {}))
    src, d0 = str(source.path), source.density or 1.0
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"Invalid sparsity value: {sparsity}")
    if 1.0 - sparsity > d0 + 1e-12:
        raise UserError(
            f"Invalid sparsity value: {sparsity} is lower than the source's {1.0 - d0:.6g} "
            f"({source.path}); pruning only removes weights"
        )
    if method == "imp" and base.sparse_structure != "unstructured":
        # IMP's rounds (and rewinding) select single weights here: refused before any stage
        raise UserError(
            f"Invalid combination: --sparse-structure {base.sparse_structure} with --method "
            f"{method}: {STRUCTURED_SOURCE_RULE}"
        )
    rep = dataclasses.replace
    if method == "lwm":
        stages = [Stage("1-lwm", "lwm", rep(base, init_from=src, prune="lwm", sparsity=sparsity))]
    elif method == "hydra":
        scores = rep(base, init_from=src, prune="hydra", sparse_method="dense", sparsity=sparsity)
        scores = rep(scores, epochs=score_epochs or base.epochs)
        tuned = rep(base, init_from=str(out / "1-scores" / "best.pt"), sparsity=sparsity)
        stages = [Stage("1-scores", "scores", scores), Stage("2-finetune", "finetune", tuned)]
    else:
        stages = _imp_stages(base, source, sparsity, out, rounds, rewind_epoch)
    stages = [rep(s, cfg=rep(s.cfg, out=str(out / s.name))) for s in stages]
    for s in stages:
        s.cfg.validate()
    return stages


def _imp_stages(
    base: TrainConfig,
    source: InitSource,
    sparsity: float,
    out: Path,
    rounds: int,
    rewind_epoch: int | None,
) -> list[Stage]:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"Invalid rounds value: {rounds}")
    rewind = None
    if rewind_epoch is not None:
        rewind = source.path.parent / f"epoch{rewind_epoch}.pt"
        if not rewind.is_file():
            raise UserError(
                f"Invalid rewind_epoch value: {rewind_epoch} ({rewind} does not exist: train the "
                f"source with --save-epochs {rewind_epoch})"
            )
    densities = imp_densities(1.0 - sparsity, rounds, start=source.density or 1.0)
    stages, prev = [], str(source.path)
    for r, d in enumerate(densities, start=1):
        s = sparsity if r == rounds else 1.0 - d
        cfg = dataclasses.replace(
            base,
            init_from=prev,
            prune="lwm",
            sparsity=s,
            rewind_from=None if rewind is None else str(rewind),
        )
        stages.append(Stage(f"{r}-imp", "imp", cfg))
        prev = str(out / f"{r}-imp" / "best.pt")
    return stages


def _plan_record(source: InitSource, stages: list[Stage], **plan: Any) -> dict[str, Any]:
    return {
        "format": PIPELINE_FORMAT,
        **plan,
        "source": {"path": str(source.path), "sha256": source.sha256},
        "stages": [
            {
                "name": s.name,
                "kind": s.kind,
                "config": {k: v for k, v in s.cfg.to_dict().items() if k not in EXECUTION_KEYS},
            }
            for s in stages
        ],
    }


def _prepare_out(out: Path, plan: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    record = out / "pipeline.json"
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume:
        if not record.is_file():
            raise UserError(f"nothing to resume: {record} does not exist")
        old = json.loads(record.read_text()).get("plan")
        if old != json.loads(json.dumps(plan)):
            raise UserError(f"--resume with a different pipeline than {record}; use a new --out")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"pipeline folder {out} exists and is not empty: pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if not record.is_file():
            raise UserError(f"refusing to overwrite {out}: it is not a pipeline folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(record, {"format": PIPELINE_FORMAT, "status": "running", "plan": plan})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _run_stage(stage: Stage) -> dict[str, Any]:
    """Run (or resume, or skip when finished) one stage; returns its summary."""
    cfg, d = stage.cfg, Path(stage.cfg.out or "")
    if (d / "summary.json").is_file() and (d / "best.pt").is_file():
        summary = json.loads((d / "summary.json").read_text())
        if summary.get("epochs") == cfg.epochs:
            return summary
    if (d / "last.pt").is_file():
        cfg = dataclasses.replace(cfg, resume=True)
    elif d.exists() and any(d.iterdir()):
        cfg = dataclasses.replace(cfg, overwrite=True)  # killed before its first checkpoint
    return train(cfg)[0]


def export_model(checkpoint: Path, dest: Path) -> dict[str, Any]:
    """Fold a sparse run's checkpoint into a plain state dict (:func:`~robust_agc.sparse.
    fold_masks`; it loads strictly into the unmodified architecture), save it to ``dest`` and
    return its sparsity record (RobustBench's footnote for pruned entries included)."""
    ckpt = load_checkpoint(checkpoint)
    cfg, state = ckpt["config"], ckpt["model"]
    suffix = ".weight_mask"
    masks = {k[: -len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}
    with torch.random.fork_rng(devices=[]):
        model = create_model(
            cfg["model"],
            num_classes=int(cfg["num_classes"]),
            in_channels=int(cfg["in_channels"]),
            input_size=int(cfg["input_size"]),
            widths=checkpoint_widths(ckpt),
        )
    sparse = register_masks(model, masks)
    model.load_state_dict(state, strict=True)
    plain = fold_masks(model).state_dict()
    save_checkpoint(dict(plain), dest)
    return {
        "model": dest.name,
        "model_sha256": file_sha256(dest),
        "checkpoint": str(checkpoint),
        "density": sparse.density,
        "sparsity": 1.0 - sparse.density,
        "num_active": sparse.num_active,
        "num_maskable": sparse.num_maskable,
        "layer_densities": sparse.layer_densities(),
        "footnote": FOOTNOTE,
    }


def _stage_record(stage: Stage, summary: dict[str, Any]) -> dict[str, Any]:
    final = summary.get("final", {})
    return {
        "name": stage.name,
        "kind": stage.kind,
        "dir": stage.cfg.out,
        "sparsity": stage.cfg.sparsity,
        "epochs": summary["epochs"],
        "grad_evals": summary["grad_evals"],
        "train_time_s": summary["train_time_s"],
        "cpu_time_s": summary.get("cpu_time_s", 0.0),
        "wall_time_s": summary["wall_time_s"],
        "source": {k: summary.get("source", {}).get(k) for k in ("path", "sha256")},
        "best_val_epoch": summary.get("best_val_epoch"),
        "final": {k: final.get(k) for k in ("test_clean_acc", "test_robust_acc")},
    }


def prune(
    source: str | Path,
    *,
    method: str,
    sparsity: float,
    out: str | Path | None = None,
    rounds: int = 3,
    rewind_epoch: int | None = None,
    score_epochs: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Prune the model of ``source`` (a checkpoint, or a run folder: its ``best.pt``) to
    ``sparsity`` with ``method`` (``lwm``, ``hydra`` or ``imp``; see the module docstring).

    Args:
        out: the pipeline folder (default ``runs/<source run>-<method><sparsity>``).
        rounds: ``imp``: pruning rounds.
        rewind_epoch: ``imp``: rewind to the source run's ``epoch<K>.pt`` after each pruning.
        score_epochs: ``hydra``: epochs of score training (default: ``epochs``).
        resume, overwrite: continue, or replace, the pipeline in ``out``.
        **overrides: :class:`~robust_agc.config.TrainConfig` settings of the stages (over the
            source run's configuration), e.g. ``epochs=20, optimizer="agc", objective="trades"``.

    Returns:
        The pipeline record written to ``out/pipeline.json``.

    Raises:
        UserError: a bad source or setting, before anything is written.
    """
    src = load_source(source)
    out = Path(out) if out else Path("runs") / f"{src.path.parent.name}-{method}{sparsity:g}"
    if rewind_epoch is not None and method != "imp":
        raise UserError("Invalid rewind_epoch value: rewinding is for --method imp")
    stages = plan_stages(
        src,
        method=method,
        sparsity=sparsity,
        out=out,
        rounds=rounds,
        rewind_epoch=rewind_epoch,
        score_epochs=score_epochs,
        overrides=overrides,
    )
    preflight(stages[0].cfg)
    plan = _plan_record(
        src, stages, method=method, sparsity=sparsity, rounds=rounds, rewind_epoch=rewind_epoch
    )
    _prepare_out(out, plan, resume=resume, overwrite=overwrite)
    summaries = [_run_stage(s) for s in stages]
    export = export_model(Path(stages[-1].cfg.out or "") / "best.pt", out / "model.pt")
    per = [_stage_record(s, m) for s, m in zip(stages, summaries)]
    sums = {k: sum(p[k] for p in per) for k in ("grad_evals", "train_time_s", "cpu_time_s")}
    record = {
        "format": PIPELINE_FORMAT,
        "status": "complete",
        "plan": plan,
        "method": method,
        "out": str(out),
        "source": src.provenance(),
        "stages": per,
        **sums,
        **{f"{k}_total": v + src.totals[f"{k}_total"] for k, v in sums.items()},
        **export,
    }
    _write_json(out / "pipeline.json", record)
    return record
