"""``robust-agc export``: a filter/channel-sparse checkpoint as a physically smaller network.

The checkpoint is rebuilt (masks folded), its removable channels deleted with
:func:`robust_agc.sparse.export_structured`, and the result written as a checkpoint of plain
tensors: ``model`` (the small state dict), ``config`` (the training config),
``widths`` (layer name -> output width, from which the registry rebuilds the architecture) and
``export`` (parameter counts before and after). ``robust-agc eval`` and
:func:`robust_agc.eval.load_model` read it like any checkpoint (``weights_only`` loading).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from ..errors import UserError
from ..sparse import export_structured

__all__ = ["add_export_command", "export_checkpoint", "run_export"]

logger = logging.getLogger(__name__)


def add_export_command(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-parser to ``sub`` (from ``add_subparsers``) and return it."""
    parser = sub.add_parser(
        "export", help="shrink a filter/channel-sparse checkpoint into a smaller network"
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="a training checkpoint (last.pt, best.pt)"
    )
    parser.add_argument("--out", required=True, help="the smaller network's checkpoint file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def export_checkpoint(
    src: str | Path, dst: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write the shrunk network of checkpoint ``src`` to ``dst``; returns the ``export`` record.

    Raises:
        UserError: ``dst`` exists without ``overwrite``, or nothing can be removed (the
            checkpoint has no filter or channel sparsity).
        CheckpointError: ``src`` is missing, unsafe or not a training checkpoint.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists (pass --overwrite to replace it)")
    ckpt = load_checkpoint(src)
    model = build_model_from_checkpoint(ckpt)
    cfg = dict(ckpt["config"])
    shape = (int(cfg["in_channels"]), int(cfg["input_size"]), int(cfg["input_size"]))
    small, widths = export_structured(model, shape)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    if after == before:
        raise UserError(
            f"nothing to remove in {src}: no whole filter or input channel is zero "
            "(train with --sparse-structure filter or channel)"
        )
    record = {"source": str(src), "params_before": before, "params_after": after}
    out = {
        "model": {k: v.detach().cpu() for k, v in small.state_dict().items()},
        "config": cfg,
        "widths": widths,
        "epoch": ckpt.get("epoch"),
        "version": __version__,
        "export": record,
    }
    save_checkpoint(out, dst)
    return record


def run_export(args: argparse.Namespace) -> int:
    """Run ``robust-agc export``; returns the exit status (0). User errors raise UserError."""
    rec = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(
        f"exported {args.out}: {rec['params_after']} parameters "
        f"({rec['params_after'] / rec['params_before']:.3f} of {rec['params_before']})"
    )
    return 0
