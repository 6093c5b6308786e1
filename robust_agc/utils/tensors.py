"""Tensor and module guards used by training, the optimizer and the evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from attacks.base import frozen_parameters

__all__ = ["all_finite", "eval_mode", "frozen_parameters"]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device synchronisation)."""
    if not tensors:
        return True
    # amax propagates NaN, and the largest magnitude is inf exactly when an element is
    return bool(torch.isfinite(torch.stack([t.detach().abs().amax() for t in tensors])).all())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's own previous mode
    (a model whose submodules were in mixed modes gets them back as they were), on error too."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
