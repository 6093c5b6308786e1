"""Checkpoints: atomic writes, and loading that never unpickles arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, loaded with
``torch.load(..., weights_only=True)``: a file carrying any other pickled object (a payload that would
run code on load) is refused with :class:`~robust_agc.errors.CheckpointError` before anything runs.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "build_model_from_checkpoint",
    "checkpoint_widths",
    "strip_prefixes",
    "atomic_write_bytes",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Save ``obj`` atomically: a reader (or a crash) never sees a half-written file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, not a torch checkpoint, corrupt, or carries objects
            other than tensors and plain containers (refused without running them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = [
            ln.strip()
            for ln in str(e).splitlines()
            if "Unsupported global" in ln or "Unsupported class" in ln
        ]
        if detail:
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain containers "
                f"(unsafe pickle; nothing was executed): {detail[0][:200]}"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a valid torch checkpoint"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a robust_agc checkpoint (got {type(obj).__name__})")
    return obj


def strip_prefixes(
    state_dict: dict[str, Any], prefixes: tuple[str, ...] = ("module.", "model.")
) -> dict[str, Any]:
    """Remove DataParallel/DDP (``module.``) and wrapper (``model.``) prefixes, RobustBench style."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p) :]
                    changed = True
        out[k] = v
    return out


def checkpoint_widths(ckpt: dict[str, Any]) -> dict[str, int] | None:
    """The per-layer widths a structurally pruned model's checkpoint carries (``robust-agc
    export``, or a run trained from one), ``None`` for the architecture's own.

    Raises:
        CheckpointError: ``widths`` is not a mapping of layer names to ints.
    """
    widths = ckpt.get("widths")
    if widths is not None and not (
        isinstance(widths, dict)
        and all(isinstance(k, str) and isinstance(v, int) for k, v in widths.items())
    ):
        raise CheckpointError("checkpoint 'widths' is not a mapping of layer names to ints")
    return widths


def _fold_hydra_scores(
    state: dict[str, Tensor], cfg: dict[str, Any], widths: dict[str, int] | None = None
) -> dict[str, Tensor]:
    """A HYDRA score run's state dict (``--prune hydra``: parametrised weights and scores) as the
    plain state dict of the network it evaluates: each weight times the top-k of its scores at
    the run's sparsity, allocation and scope (:func:`robust_agc.prune.scores.fold_score_state`);
    with filter scores, the filter-pruned network they select
    (:func:`robust_agc.prune.filter_scores.fold_filter_score_state`). Any other state dict is
    returned unchanged."""
    from .prune.filter_scores import filter_score_tensors, fold_filter_score_state
    from .prune.scores import fold_score_state, score_keys

    if filter_score_tensors(state) is not None:
        try:
            return fold_filter_score_state(state, cfg, widths)[0]
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot fold the HYDRA filter scores of this checkpoint: {e}"
            ) from None
    if not score_keys(state):
        return state
    try:
        plain, _ = fold_score_state(
            state,
            density=1.0 - float(cfg["sparsity"]),
            distribution=str(cfg.get("sparse_init", "uniform")),
            scope=str(cfg.get("prune_scope") or "layerwise"),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot fold the HYDRA scores of this checkpoint: {e}") from None
    return plain


def build_model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture recorded in a checkpoint's config and load its weights.

    Sparsity masks are multiplied into the weights and the mask buffers dropped, giving a plain
    module (RobustBench style); a HYDRA score run's weights are multiplied by the top-k of their
    scores. A structurally pruned model (``robust-agc export``) carries ``widths`` (layer name ->
    output width) next to its config, and is rebuilt at those widths. The model is returned in
    eval mode.

    Raises:
        CheckpointError: no model or config in the checkpoint, or weights that do not fit the
            recorded architecture.
    """
    from .models import model_from_config

    if "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError("not a robust_agc training checkpoint (no 'model' or 'config' entry)")
    cfg = ckpt["config"]
    widths = checkpoint_widths(ckpt)
    try:
        model = model_from_config(cfg, widths)
    except KeyError as e:
        raise CheckpointError(f"checkpoint config lacks {e}") from None
    state = strip_prefixes(ckpt["model"])
    state = _fold_hydra_scores(state, cfg, widths)
    masks = {k: v for k, v in state.items() if k.endswith("weight_mask")}
    weights = {k: v for k, v in state.items() if not k.endswith("weight_mask")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint weights do not fit architecture {cfg['model']!r}: {first}"
        ) from None
    if masks:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, m in masks.items():
                wname = k[: -len("_mask")]
                if wname not in params or params[wname].shape != m.shape:
                    raise CheckpointError(f"mask {k} does not match a weight of {cfg['model']!r}")
                keep = m.to(params[wname].device).bool()  # the masks may be loaded onto a GPU
                params[wname].copy_(
                    torch.where(keep, params[wname], torch.zeros_like(params[wname]))
                )
    return model.eval()
