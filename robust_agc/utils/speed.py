"""Measured inference speed and counted FLOPs of plain modules, shared by the benchmarks
(``benchmarks/structured_speed.py``) and the study driver's speed records
(:func:`robust_agc.cli.export.measure_export_speed`).

- :func:`count_flops`: conv/linear FLOPs (2 per multiply-add) of one input, from forward hooks.
- :func:`time_inference`: eval-mode forward images per second of several models on one batch,
  interleaved batch by batch (machine load hits them alike), median over the timed repeats.

On a CUDA device every timed pass ends with ``torch.cuda.synchronize()`` (kernels run
asynchronously: without it the clock would stop at the launch).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["count_flops", "inference_times", "synchronize", "time_inference"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the queued kernels of ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: nn.Module, shape: Sequence[int]) -> float:
    """Conv/linear FLOPs (2 per multiply-add, biases and other layers not counted) of one input
    of ``shape`` (without the batch dimension), on the model's device; the model's training mode
    is restored."""
    total = 0.0

    def hook(m: nn.Module, inputs: object, out: Tensor) -> None:
        nonlocal total
        total += 2.0 * out.numel() / m.weight.shape[0] * m.weight.numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def inference_times(
    models: Sequence[nn.Module], x: Tensor, repeats: int, warmup: int = 1
) -> list[list[float]]:
    """Seconds of each timed eval-mode forward pass of ``x``, per model: ``warmup`` untimed
    rounds, then ``repeats`` timed ones; every round runs each model once, in order (interleaved).
    The models are left in eval mode."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Invalid repeats/warmup value: {repeats}/{warmup} (>= 1 / >= 0)")
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.eval()
    with torch.no_grad():
        for r in range(warmup + repeats):
            for i, model in enumerate(models):
                synchronize(x.device)
                t0 = time.perf_counter()
                model(x)
                synchronize(x.device)
                if r >= warmup:
                    times[i].append(time.perf_counter() - t0)
    return times


def time_inference(
    models: Sequence[nn.Module], x: Tensor, repeats: int, warmup: int = 1
) -> list[float]:
    """Images per second of each model on batch ``x``: its batch size over the median of the
    timed passes of :func:`inference_times` (interleaved, after ``warmup`` rounds)."""
    return [x.shape[0] / statistics.median(t) for t in inference_times(models, x, repeats, warmup)]
