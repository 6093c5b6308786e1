"""Which units still carry information about the input: a diagnostic for sparse networks that
predict one class.

A heavily pruned network can keep paths from input to output in its masks and still compute a
constant: when the few weights left into a unit read only units that are dead (zero for every
input) or constant, the unit is a function of its bias alone, and so is everything after it. The
masks cannot show this; the activations do. :func:`input_activity` feeds points through the model
and reports, for every ``Conv2d`` and ``Linear`` layer, how many of its input units (channels of a
convolution's input, features of a linear layer's) are nonzero on some point and how many differ
between points, and whether the logits depend on the input at all. Measuring at the layers'
inputs sees the activations whatever computes them (``nn.ReLU`` modules or ``F.relu``, pooling,
flattening).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ActivityReport", "LayerActivity", "input_activity"]


@dataclass(frozen=True)
class LayerActivity:
    """What one layer reads.

    Attributes:
        name: the layer's qualified name in the model.
        units: its input units (input channels of a ``Conv2d``, input features of a ``Linear``).
        nonzero: input units nonzero on at least one point (and position).
        varying: input units whose value differs between two points at some position: the units
            that carry information about the input. ``varying <= units``; a unit can be nonzero
            and constant (a bias passed through a ReLU).
    """

    name: str
    units: int
    nonzero: int
    varying: int


@dataclass(frozen=True)
class ActivityReport:
    """:func:`input_activity`'s result.

    Attributes:
        layers: one entry per ``Conv2d``/``Linear`` layer, in the order they ran.
        logit_std: the logits' standard deviation over the points, averaged over the classes
            (0.0: the model gives every point the same logits).
        n_points: the number of points fed.
    """

    layers: list[LayerActivity]
    logit_std: float
    n_points: int

    def to_markdown(self) -> str:
        """A table: one row per layer (input units nonzero / varying / all)."""
        rows = ["| layer | input units | nonzero on some point | vary between points |"]
        rows.append("|---|---|---|---|")
        for a in self.layers:
            rows.append(f"| {a.name} | {a.units} | {a.nonzero} | {a.varying} |")
        rows.append(f"| logits (std over points) | | | {self.logit_std:.4g} |")
        return "\n".join(rows)


class _Range:
    """Per-unit, per-position minimum and maximum over points, and whether ever nonzero."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, a: Tensor) -> None:
        a = a.detach().float()
        lo, hi = a.amin(0), a.amax(0)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def counts(self) -> tuple[int, int, int]:
        assert self.lo is not None and self.hi is not None
        lo, hi = self.lo.reshape(self.lo.shape[0], -1), self.hi.reshape(self.hi.shape[0], -1)
        nonzero = ((lo != 0) | (hi != 0)).any(1)
        varying = (hi > lo).any(1)
        return lo.shape[0], int(nonzero.sum()), int(varying.sum())


@torch.no_grad()
def input_activity(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> ActivityReport:
    """Measure which input units of every ``Conv2d``/``Linear`` layer of ``model`` are nonzero
    and which vary on the points ``x`` (see the module doc). The model runs in eval mode and is
    left in the mode it had.

    Args:
        model: the classifier (its masks folded or attached: the forward pass is what counts).
        x: inputs ``(N, ...)`` on the model's device, ``N >= 2``.
        batch_size: points per forward pass.

    Raises:
        ValueError: fewer than 2 points, a batch size below 1, or a model with no ``Conv2d`` or
            ``Linear`` layer.
    """
    if x.shape[0] < 2:
        raise ValueError(f"Invalid x value: {x.shape[0]} points (need at least 2 to compare)")
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size value: {batch_size}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ValueError("Invalid model value: no Conv2d or Linear layer to measure")
    ranges: dict[str, _Range] = {}
    order: list[str] = []

    def hook(name: str, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if name not in ranges:
            ranges[name] = _Range()
            order.append(name)
        ranges[name].update(inputs[0])

    handles = [m.register_forward_pre_hook(lambda mod, i, n=n: hook(n, mod, i)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat(
            [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
        )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    report = []
    for name in order:
        units, nonzero, varying = ranges[name].counts()
        report.append(LayerActivity(name, units, nonzero, varying))
    return ActivityReport(report, float(logits.std(0).mean()), int(x.shape[0]))
