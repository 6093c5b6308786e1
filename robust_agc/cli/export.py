"""``robust-agc export``: a filter/channel-sparse checkpoint as a physically smaller network.

The checkpoint is rebuilt (masks folded), its removable channels deleted with
:func:`robust_agc.sparse.export_structured`, and the result written as a checkpoint of plain
tensors: ``model`` (the small state dict), ``config`` (the training config),
``widths`` (layer name -> output width, from which the registry rebuilds the architecture) and
``export`` (parameter counts before and after). ``robust-agc eval`` and
:func:`robust_agc.eval.load_model` read it like any checkpoint (``weights_only`` loading).

:func:`measure_export_speed` times the shrunk network of a checkpoint against its full-width
(dense) architecture in one process (the study driver's ``speed.json``, ``experiments/run_study.py``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from ..errors import UserError
from ..sparse import export_structured, layer_widths
from ..utils.machine import machine_info
from ..utils.speed import count_flops, inference_times

__all__ = ["add_export_command", "export_checkpoint", "measure_export_speed", "run_export"]

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
    ckpt, model, small, widths = _shrink(src)
    cfg = dict(ckpt["config"])
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


def _shrink(src: str | Path) -> tuple[dict[str, Any], nn.Module, nn.Module, dict[str, int]]:
    """``(checkpoint, full-width model with masks folded, shrunk model, its widths)``."""
    ckpt = load_checkpoint(src)
    model = build_model_from_checkpoint(ckpt)
    cfg = ckpt["config"]
    shape = (int(cfg["in_channels"]), int(cfg["input_size"]), int(cfg["input_size"]))
    small, widths = export_structured(model, shape)
    return ckpt, model, small, widths


def measure_export_speed(
    src: str | Path, *, batch_size: int = 128, repeats: int = 30, warmup: int = 5
) -> dict[str, Any]:
    """Inference speed of checkpoint ``src``'s shrunk network (:func:`export_structured`) and of
    its full-width architecture (the masks folded: a dense network's speed), timed in this
    process with torch's current thread count.

    One batch of ``batch_size`` uniform [0, 1) inputs (generator seed 0); eval-mode forward passes
    of the two networks interleaved batch by batch, ``warmup`` untimed rounds, then ``repeats``
    timed ones (:func:`robust_agc.utils.speed.inference_times`); images/s = batch size over the
    median pass. A checkpoint without removable channels (dense, unstructured masks) is timed as
    well: its shrunk network is the full-width one, so the ratio measures the timing noise.

    Returns:
        A JSON-ready record: ``settings`` (batch size, repeats, warm-up, threads, input shape),
        ``machine`` (:func:`~robust_agc.utils.machine_info`), ``torch``, ``dense`` and
        ``exported`` (``images_per_s``, ``params``, ``flops`` of one image, ``widths``,
        ``times_s`` of each timed pass), ``speedup`` (exported over dense images/s),
        ``flops_ratio`` and ``params_ratio`` (exported over dense).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise UserError(
            f"Invalid speed settings: batch_size {batch_size}, repeats {repeats}, warmup {warmup}"
        )
    ckpt, dense, small, widths = _shrink(src)
    cfg = ckpt["config"]
    shape = (int(cfg["in_channels"]), int(cfg["input_size"]), int(cfg["input_size"]))
    x = torch.rand((batch_size, *shape), generator=torch.Generator().manual_seed(0))
    times = inference_times([dense, small], x, repeats, warmup)
    parts = {}
    for key, net, wid, t in (
        ("dense", dense, layer_widths(dense), times[0]),
        ("exported", small, widths, times[1]),
    ):
        parts[key] = {
            "images_per_s": batch_size / statistics.median(t),
            "params": sum(p.numel() for p in net.parameters()),
            "flops": count_flops(net, shape),
            "widths": wid,
            "times_s": t,
        }
    d, e = parts["dense"], parts["exported"]
    return {
        "checkpoint": str(src),
        "model": cfg.get("model"),
        "settings": {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "input_shape": list(shape),
            "input": "uniform [0, 1), torch.Generator seed 0",
            "timing": "eval-mode forward, dense and exported interleaved, median of the repeats",
        },
        "machine": machine_info(),
        "torch": torch.__version__,
        "version": __version__,
        "dense": d,
        "exported": e,
        "speedup": e["images_per_s"] / d["images_per_s"],
        "flops_ratio": e["flops"] / d["flops"],
        "params_ratio": e["params"] / d["params"],
    }


def run_export(args: argparse.Namespace) -> int:
    """Run ``robust-agc export``; returns the exit status (0). User errors raise UserError."""
    rec = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(
        f"exported {args.out}: {rec['params_after']} parameters "
        f"({rec['params_after'] / rec['params_before']:.3f} of {rec['params_before']})"
    )
    return 0
