"""Accuracy of a model on tensors, clean or under an attack, across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..utils import comm_device, dist_info, eval_mode

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy (in [0, 1]) of ``model`` in eval mode on ``(x, y)``, optionally under ``attack``.

    Every submodule gets its own previous mode back afterwards (on error too). Under
    ``torch.distributed`` each rank evaluates its slice and the counts are summed.
    """
    if x.shape[0] == 0:
        return float("nan")
    total = x.shape[0]
    rank, world = dist_info()
    if world > 1:
        x, y = x[rank::world], y[rank::world]
    correct = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            if attack is not None:
                xb = attack(xb, yb)
            with torch.no_grad():
                correct += int((model(xb).argmax(1) == yb).sum())
    if world > 1:
        t = torch.tensor([correct], dtype=torch.int64, device=comm_device(device))
        dist.all_reduce(t)
        correct = int(t.item())
    return correct / total
