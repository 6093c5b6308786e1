"""Shared building blocks: in-model normalization and initialisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "init_weights", "width"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so models take inputs in [0, 1] (RobustBench convention)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-in, ReLU gain) for hidden conv and linear weights, a zero classifier head,
    zero biases, unit norm layers.

    The head (the model's last ``nn.Linear``) starts at zero so that the initial loss is ``log(C)``:
    with He-normal heads and inputs normalized inside the model, the initial logits are large and
    SGD at usual learning rates (0.05, Nesterov) diverged to NaN in adversarial training of
    ``small-cnn`` on Fashion-MNIST here, while the zero head trained (see tests/test_models.py).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if m is head:
                nn.init.zeros_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def width(widths: Mapping[str, int] | None, name: str, default: int) -> int:
    """The output width of layer ``name``: ``widths[name]`` when given (a structurally pruned
    model, :func:`robust_agc.sparse.export_structured`), else the architecture's ``default``."""
    if widths is None or name not in widths:
        return default
    value = widths[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid widths value: {name!r}: {value!r} (a positive int)")
    return value
