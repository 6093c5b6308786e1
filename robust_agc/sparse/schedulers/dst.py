"""Drop-and-grow topology schedulers: static, SET, RigL and their ITOP variants.

SET regrows at random (seeded CPU generator whose state is in ``state_dict``), RigL where the
**dense** gradient of the training loss at this step has the largest magnitude. RigL's dense
gradient comes from the masks' optimizer pre-hook, which stashes ``p.grad`` *before* masking it
on the steps this scheduler will update (so ``SparseMasks.attach(optimizer)`` is required). The
shared mechanics are in :class:`~robust_agc.sparse.schedulers.base.TopologyScheduler`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..masks import SparseMasks
from .base import SPARSE_METHOD_DEFAULTS, TopologyScheduler, register_sparse_method

__all__ = ["RigLScheduler", "SETScheduler", "StaticScheduler", "build_drop_and_grow"]


class StaticScheduler(TopologyScheduler):
    """Fixed topology: ``step()`` only counts steps."""

    dynamic = False


class SETScheduler(TopologyScheduler):
    """SET (Mocanu et al. 2018): drop smallest ``|w|``, regrow uniformly at random."""

    uses_random = True

    def _grow_scores(self, index: int, weight: Tensor, data: Any) -> Tensor:
        return torch.rand(weight.numel(), generator=self.generator)


class RigLScheduler(TopologyScheduler):
    """RigL (Evci et al. 2020): drop smallest ``|w|``, regrow at the largest dense ``|grad|``."""

    needs_dense_grad = True

    def _prepare_scores(self) -> list[Tensor | None]:
        grads = self.masks.pop_dense_grads()
        if grads is None:
            if self.masks.optimizers:
                raise RuntimeError(
                    "RigL found no dense gradient for this update step: the masks' optimizer "
                    "pre-hook stashes it during optimizer.step(); call scheduler.step() right "
                    "after optimizer.step() on every training step"
                )
            # Not attached: nothing masked p.grad, so it is still the dense gradient.
            grads = [None if w.grad is None else w.grad.detach() for w in self.masks.weights()]
        if any(g is None for g in grads):
            warnings.warn(
                "RigL: some masked weights have no gradient; growth there is arbitrary",
                stacklevel=3,
            )
        return grads

    def _grow_scores(self, index: int, weight: Tensor, data: Any) -> Tensor:
        g = data[index]
        if g is None:
            return torch.zeros(weight.numel(), device=weight.device)
        return g.abs().reshape(-1)


_CLASSES: dict[str, type[TopologyScheduler]] = {
    "static": StaticScheduler,
    "set": SETScheduler,
    "rigl": RigLScheduler,
    "itop-set": SETScheduler,
    "itop-rigl": RigLScheduler,
}


def build_drop_and_grow(
    masks: SparseMasks,
    *,
    method: str,
    total_steps: int,
    generator: torch.Generator | int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    update_interval: int | None = None,
    drop_fraction: float | None = None,
    update_end: float | None = None,
) -> TopologyScheduler:
    """The :func:`~robust_agc.sparse.create_scheduler` builder of the drop-and-grow methods:
    unset options take the method's :data:`SPARSE_METHOD_DEFAULTS`."""
    defaults = SPARSE_METHOD_DEFAULTS[method]
    if method.startswith("itop") and getattr(masks, "distribution", None) not in (None, "erk"):
        warnings.warn(
            f"{method} is defined with ERK masks, these are {masks.distribution!r}", stacklevel=3
        )
    return _CLASSES[method](
        masks,
        method=method,
        total_steps=total_steps,
        update_interval=int(defaults["update_interval"])
        if update_interval is None
        else update_interval,
        drop_fraction=float(defaults["drop_fraction"]) if drop_fraction is None else drop_fraction,
        update_end=float(defaults["update_end"]) if update_end is None else update_end,
        generator=generator,
        optimizer=optimizer,
    )


for _name in _CLASSES:
    register_sparse_method(_name, build_drop_and_grow)
