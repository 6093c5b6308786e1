"""The source of a stage: a checkpoint read once, hashed, folded, and checked against the run.

``--init-from CKPT`` (:attr:`robust_agc.config.TrainConfig.init_from`) starts a run from another
run's checkpoint. What is taken from the source and what starts fresh:

- taken: the model's parameters and buffers (BatchNorm statistics included) with the source's
  masks folded in (pruned weights exactly zero), loaded strictly into the run's architecture, at
  the source's layer widths when it is a structurally pruned (exported) network, so the run
  trains that smaller network;
  with a sparse method, the source's masks when the source is sparse (a HYDRA score run's masks
  are the top-k of its scores);
- fresh: the optimizer and its state, the epoch and step counters (``grad_evals`` counts this
  run only; the source's totals are in the record), the learning-rate schedule and warm-up,
  every random stream (seeded from this run's ``--seed``).

With a sparse method and no ``--prune``, a sparse source's masks are kept as they are (the run's
``--sparsity`` must be the source's), and a dense source gets random masks (the ``masks``
stream, exact counts, surviving weights not rescaled). ``--prune lwm`` chooses the masks by the
source weights' magnitude (:mod:`~robust_agc.prune.magnitude`), among the source's active
positions (with ``--sparse-structure filter``: whole filters by their L1 norm, Li et al. 2017,
from a dense source); ``--rewind-from CKPT`` then replaces the weights by that checkpoint's (IMP's
rewinding) and keeps the masks. ``--prune hydra`` parametrises the weights with importance
scores (:mod:`~robust_agc.prune.scores`), or, with ``--sparse-structure filter``, gives each
filter channel a score (:mod:`~robust_agc.prune.filter_scores`); a run started from such a
filter-score checkpoint fine-tunes the filters its scores select, at its sparsity and counts.

Every check here runs before a run folder is created (:func:`preflight`), so a bad source
(missing, corrupt, unsafe, another architecture, a sparsity below the source's) is one line and
exit status 2 with nothing written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import checkpoint_widths, load_checkpoint
from ..config import STRUCTURED_SOURCE_RULE, TrainConfig
from ..data import DATASET_INFO
from ..errors import CheckpointError, UserError
from ..models import create_model
from ..sparse import (
    MASK_BUFFER,
    SIGN_BUFFER,
    SparseMasks,
    apply_masks,
    apply_structured_masks,
    maskable_modules,
)
from .filter_scores import attach_filter_scores, filter_score_tensors, fold_filter_score_state
from .magnitude import magnitude_masks, register_masks
from .scores import attach_scores, fold_score_state, score_keys

__all__ = [
    "InitSource",
    "check_resume_source",
    "file_sha256",
    "load_source",
    "load_weights",
    "prepare_model",
    "preflight",
    "source_masks",
]

_COUNTERS = ("epoch", "grad_evals", "train_time_s", "cpu_time_s", "wall_time_s")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class InitSource:
    """A loaded source checkpoint: the plain (folded) state dict, its masks and its record."""

    path: Path
    sha256: str
    config: dict[str, Any]
    state: dict[str, Tensor]
    masks: dict[str, Tensor] | None
    counters: dict[str, Any]
    totals: dict[str, float]
    # layer name -> output width of a structurally pruned (exported) source; None: the
    # architecture's own widths. A run started from it builds (and trains) that smaller network.
    widths: dict[str, int] | None = None
    # a HYDRA filter-score run's scores (|s| per channel of each filter group, in group order);
    # its ``state``/``masks`` are the filter-pruned network they select
    filter_scores: list[Tensor] | None = None

    @property
    def density(self) -> float | None:
        """Density over the source's masked layers (``None`` for a dense source)."""
        if not self.masks:
            return None
        return sum(int(m.sum()) for m in self.masks.values()) / sum(
            m.numel() for m in self.masks.values()
        )

    def provenance(self) -> dict[str, Any]:
        """The record a run started from this source carries (``summary.json``'s ``source``).

        ``epoch``, ``grad_evals``... are the checkpoint's counters, ``run`` the whole source run's
        (its ``summary.json``, when there is one); ``grad_evals_total``, ``train_time_s_total`` and
        ``cpu_time_s_total`` are the whole run's (else the checkpoint's) plus those of the
        source's own sources (a chain of stages), so a run's total compute is its own plus these."""
        rec: dict[str, Any] = {
            "path": str(self.path),
            "sha256": self.sha256,
            "run_dir": str(self.path.parent)
            if (self.path.parent / "config.yaml").is_file()
            else None,
            "model": self.config.get("model"),
            "dataset": self.config.get("dataset"),
            "sparse_method": self.config.get("sparse_method"),
            "prune": self.config.get("prune"),
            "density": self.density,
        }
        rec.update(self.counters)
        rec.update(self.totals)
        return rec


def load_source(path: str | Path) -> InitSource:
    """Read a training checkpoint (a run folder means its ``best.pt``) as an :class:`InitSource`.

    Raises:
        CheckpointError: missing, unreadable, unsafe, or not a robust_agc training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a robust_agc training checkpoint (no model/config)")
    cfg = ckpt["config"]
    state = dict(ckpt["model"])
    widths = checkpoint_widths(ckpt)
    filter_scores = filter_score_tensors(state)
    try:
        if filter_scores is not None:
            state, masks = fold_filter_score_state(state, cfg, widths)
            filter_scores = [t.detach().abs().cpu() for t in filter_scores]
        elif score_keys(state):
            state, masks = fold_score_state(
                state,
                density=1.0 - float(cfg["sparsity"]),
                distribution=str(cfg.get("sparse_init", "uniform")),
                scope=str(cfg.get("prune_scope") or "layerwise"),
            )
        else:
            state, masks = _fold_masks(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the model of {path}: {e}") from None
    counters = {k: ckpt[k] for k in _COUNTERS if isinstance(ckpt.get(k), (int, float))}
    run = _run_counters(path)
    if run:
        counters["run"] = run
    prev = ckpt.get("source") if isinstance(ckpt.get("source"), dict) else {}
    totals = {
        f"{k}_total": float((run or counters).get(k, 0)) + float(prev.get(f"{k}_total", 0))
        for k in ("grad_evals", "train_time_s", "cpu_time_s")
    }
    totals["grad_evals_total"] = int(totals["grad_evals_total"])
    return InitSource(
        path,
        file_sha256(path),
        cfg,
        state,
        masks or None,
        counters,
        totals,
        widths,
        filter_scores,
    )


def _run_counters(path: Path) -> dict[str, float] | None:
    """The whole source run's compute (its ``summary.json``): a ``best.pt`` from epoch 3 of a
    10-epoch run cost the 10 epochs, since the run had to finish to select it."""
    summary = path.parent / "summary.json"
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
        return {k: data[k] for k in ("epochs", "grad_evals", "train_time_s", "cpu_time_s")}
    except (ValueError, KeyError, TypeError):
        return None


def _fold_masks(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    suffix = "." + MASK_BUFFER
    masks = {k[: -len(suffix)]: v.bool() for k, v in state.items() if k.endswith(suffix)}
    out = {
        k: v
        for k, v in state.items()
        if not k.endswith(suffix) and not k.endswith("." + SIGN_BUFFER)
    }
    for name, m in masks.items():
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = torch.where(m, w, torch.zeros((), dtype=w.dtype))
    return out, masks


def load_weights(model: nn.Module, source: InitSource) -> None:
    """Load the source's plain state dict into ``model``: every entry, strictly, except the
    model's own mask buffers (a :class:`CheckpointError` naming the source when it is another
    architecture)."""
    try:
        missing, unexpected = model.load_state_dict(source.state, strict=False)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
    else:
        missing = [k for k in missing if not k.endswith("." + MASK_BUFFER)]
        if not missing and not unexpected:
            return
        detail = f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
    raise CheckpointError(
        f"source {source.path} ({source.config.get('model')!r}) does not fit this run's "
        f"architecture: {detail[:200]}"
    )


def _check_sparsity(cfg: TrainConfig, source: InitSource) -> None:
    if source.filter_scores is not None:
        _check_filter_score_source(cfg, source)
        return
    if source.masks is None or (cfg.sparse_method == "dense" and cfg.prune is None):
        return
    n = sum(m.numel() for m in source.masks.values())
    have = sum(int(m.sum()) for m in source.masks.values())
    want = round((1.0 - cfg.sparsity) * n)
    src = 1.0 - have / n
    if want > have:
        raise UserError(
            f"Invalid sparsity value: {cfg.sparsity} is lower than the source's {src:.6g} "
            f"({source.path}); pruning only removes weights"
        )
    if cfg.prune is None and want != have:
        raise UserError(
            f"Invalid sparsity value: {cfg.sparsity} (the masks of {source.path} have sparsity "
            f"{src:.6g}: fine-tune them with --sparsity {src:.6g}, or prune further with --prune lwm)"
        )


def _check_filter_score_source(cfg: TrainConfig, source: InitSource) -> None:
    """A HYDRA filter-score source is fine-tuned as it is: filters, no --prune, and the
    sparsity, allocation and first-layer rule its counts were made with."""
    src = source.config
    want = float(src.get("sparsity", -1))
    init, first = src.get("sparse_init", "uniform"), bool(src.get("dense_first_layer", False))
    if (
        cfg.sparse_structure != "filter"
        or cfg.prune is not None
        or (cfg.sparsity, cfg.sparse_init, cfg.dense_first_layer) != (want, init, first)
    ):
        raise UserError(
            f"Invalid source value: {source.path} holds HYDRA filter scores; fine-tune the "
            f"filters they select with --sparse-structure filter --sparsity {want:g} "
            f"--sparse-init {init}{' --dense-first-layer' if first else ''} and no --prune"
        )


def prepare_model(
    cfg: TrainConfig, model: nn.Module, source: InitSource | None = None
) -> InitSource | None:
    """``--init-from``: load the source into ``model`` (built by the run, before its masks and
    optimizer, at ``source.widths``) and, with ``--prune hydra``, attach the scores; ``None``
    without ``--init-from``. ``source``: the already loaded ``cfg.init_from`` (read it once)."""
    if cfg.init_from is None:
        return None
    if source is None:
        source = load_source(cfg.init_from)
    _check_sparsity(cfg, source)
    load_weights(model, source)
    if cfg.prune == "hydra" and cfg.sparse_structure == "filter":
        if source.masks is not None:
            raise UserError(
                f"Invalid source value: {source.path} is sparse; HYDRA filter scores "
                "(--sparse-structure filter --prune hydra) start from a dense source"
            )
        try:
            attach_filter_scores(
                model,
                density=1.0 - cfg.sparsity,
                input_shape=_input_shape(cfg),
                distribution=cfg.sparse_init,
                dense_first_layer=cfg.dense_first_layer,
            )
        except ValueError as e:
            raise UserError(f"{e} (source {source.path})") from None
    elif cfg.prune == "hydra":
        attach_scores(
            model,
            density=1.0 - cfg.sparsity,
            distribution=cfg.sparse_init,
            scope=cfg.prune_scope or "layerwise",
            dense_first_layer=cfg.dense_first_layer,
        )
    return source


def source_masks(
    cfg: TrainConfig, model: nn.Module, source: InitSource, *, generator: torch.Generator
) -> SparseMasks:
    """The initial masks of a run started from ``source`` (see the module docstring)."""
    if cfg.sparse_structure == "filter":  # --prune lwm, or a filter-score source
        return _filter_masks(cfg, model, source)
    if cfg.prune == "lwm":
        layers = maskable_modules(model)[1 if cfg.dense_first_layer else 0 :]
        have = source.masks or {}
        allowed = [have.get(n, torch.ones_like(m.weight, dtype=torch.bool)) for n, m in layers]
        try:
            chosen = magnitude_masks(
                [m.weight for _, m in layers],
                1.0 - cfg.sparsity,
                distribution=cfg.sparse_init,
                scope=cfg.prune_scope or "layerwise",
                allowed=allowed,
            )
        except ValueError as e:
            raise UserError(f"{e} (source {source.path}; try --prune-scope global)") from None
        masks = register_masks(model, {n: c for (n, _), c in zip(layers, chosen)})
        if cfg.rewind_from is not None:
            load_weights(model, load_source(cfg.rewind_from))
            masks.apply_()
        return masks
    if source.masks is not None:
        return register_masks(model, source.masks)
    return apply_masks(
        model,
        sparsity=cfg.sparsity,
        distribution=cfg.sparse_init,
        dense_first_layer=cfg.dense_first_layer,
        rescale_init=False,
        generator=generator,
    )


def _input_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """One input's shape (channels, height, width) for the run's dataset."""
    info = DATASET_INFO[cfg.dataset]
    return (info.in_channels, info.input_size, info.input_size)


def _filter_masks(cfg: TrainConfig, model: nn.Module, source: InitSource) -> SparseMasks:
    """``--sparse-structure filter`` from a source, per coupled group at the counts of
    ``--sparse-init``: the filters a HYDRA filter-score source selects (the top-k of its scores;
    the loaded weights are already the pruned network's), or with ``--prune lwm`` the filters of
    largest L1 norm of a dense source (Li et al. 2017)."""
    if source.filter_scores is None:
        if cfg.prune != "lwm":
            raise UserError(
                f"Invalid source value: {source.path} has no HYDRA filter scores; "
                f"{STRUCTURED_SOURCE_RULE}"
            )
        if source.masks is not None:
            raise UserError(
                f"Invalid source value: {source.path} is sparse; L1 filter pruning "
                "(--sparse-structure filter --prune lwm) starts from a dense source"
            )
    try:
        return apply_structured_masks(
            model,
            sparsity=cfg.sparsity,
            structure="filter",
            input_shape=_input_shape(cfg),
            distribution=cfg.sparse_init,
            criterion="l1",
            dense_first_layer=cfg.dense_first_layer,
            rescale_init=False,
            generator=0,
            channel_scores=source.filter_scores,
        )
    except ValueError as e:
        raise UserError(f"{e} (source {source.path})") from None


def preflight(cfg: TrainConfig) -> InitSource | None:
    """Every check of :func:`prepare_model` and :func:`source_masks` on a scratch model (the
    global RNG is left as it was), before anything is written."""
    if cfg.init_from is None:
        return None
    info = DATASET_INFO[cfg.dataset]
    source = load_source(cfg.init_from)
    with torch.random.fork_rng(devices=[]):
        model = create_model(
            cfg.model,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            input_size=info.input_size,
            mean=info.mean,
            std=info.std,
            widths=source.widths,
        )
        prepare_model(cfg, model, source)
        if cfg.sparse_method != "dense":
            source_masks(cfg, model, source, generator=torch.Generator().manual_seed(0))
    return source


def check_resume_source(ckpt: dict[str, Any], source: InitSource | None) -> None:
    """On ``--resume``: the source must be the file the run started from (same SHA-256)."""
    saved = ckpt.get("source")
    if source is None or not isinstance(saved, dict):
        return
    if saved.get("sha256") != source.sha256:
        raise UserError(
            f"--resume: the source {source.path} changed since the run started "
            f"(sha256 {str(saved.get('sha256'))[:12]}... -> {source.sha256[:12]}...)"
        )
