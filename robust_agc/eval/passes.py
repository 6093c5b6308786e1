"""Counting the model passes an evaluation spends (the record's ``passes`` field).

:class:`PassCounter` hooks the model's output to count forward and backward passes in single
examples; :func:`predict_measuring_passes` measures RobustBench's ``number_forward_passes`` on the
first clean chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PassCounter", "add_passes", "predict_measuring_passes"]


class PassCounter:
    """Count the model's forward and backward passes in single examples (a forward hook).

    A forward pass on a batch of ``B`` adds ``B``; when the output requires grad, a hook on it adds
    ``B`` backward passes each time a gradient flows back through it (once per ``backward``/
    ``autograd.grad``, so FAB's per-class Jacobian rows count one pass each).
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward = 0
        self.backward = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        b = int(output.shape[0]) if output.ndim > 0 else 1
        self.forward += b
        if output.requires_grad:
            output.register_hook(lambda grad, b=b: self._backward(b))

    def _backward(self, b: int) -> None:
        self.backward += b

    def take(self) -> list[int]:
        """``[forward, backward]`` counted since the last call, and reset."""
        out = [self.forward, self.backward]
        self.forward = self.backward = 0
        return out

    def remove(self) -> None:
        """Take the hook off the model."""
        self._handle.remove()


def predict_measuring_passes(model: nn.Module, x: Tensor) -> tuple[Tensor, int | float]:
    """``model(x)`` without grad, and the network passes per example it took.

    Every module holding parameters of its own counts the examples it processes (the leading
    dimension of its first input); the fewest, divided by ``len(x)``, is the number of times the
    whole network ran per example: 1 for a plain network (a module reused inside one pass does not
    raise the minimum), ``k`` for a wrapper that averages ``k`` passes of an inner network, whether
    it loops or stacks the copies into one batch.
    """
    seen: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: Any) -> None:
        first = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if isinstance(first, Tensor) and first.ndim > 0:
            seen[module] = seen.get(module, 0) + int(first.shape[0])

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(hook) for m in owners]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return out, 1
    ratio = min(seen.values()) / x.shape[0]
    return out, int(ratio) if float(ratio).is_integer() else round(ratio, 3)


def add_passes(*counts: Sequence[int]) -> list[int]:
    """Element-wise sum of ``[forward, backward]`` pairs."""
    return [sum(c[0] for c in counts), sum(c[1] for c in counts)]
