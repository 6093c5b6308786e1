"""The extra passes of AGC: gradients at the snapshot and over the refresh data, and their reductions.

:class:`~robust_agc.optim.AGC` needs gradients at points other than the model's current weights
(the snapshot ``ws``) and gradients that must not disturb training (the refresh's full gradient
``mu``). Everything here computes them without side effects (``docs/agc.md``, "Refreshes and the
full gradient"):

- :class:`FunctionalView` and :func:`cloned_buffers`: the model called through
  ``torch.func.functional_call`` with substituted parameters and private buffer clones, so
  BatchNorm running statistics and ``p.grad`` are never touched;
- :func:`scaled_grad`: a loss-scaled gradient (float16 mixed precision) that retries at half the
  scale while it overflows (``docs/agc.md``, "Mixed precision");
- :func:`full_gradient_pass`: the refresh's loop over its batches (the example-weighted gradient
  sum and the per-batch losses at the current weights and at the previous snapshot);
- :func:`dist_active`, :func:`all_reduce_flat`, :func:`dist_reduce`: the reductions over the ranks
  of a data-parallel run (``docs/agc.md``, "Distributed training").

The variance probe (:mod:`robust_agc.optim.probe`) uses the same view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from ..utils.tensors import all_finite

__all__ = [
    "FunctionalView",
    "GradientPass",
    "all_reduce_flat",
    "cloned_buffers",
    "dist_active",
    "dist_reduce",
    "full_gradient_pass",
    "scaled_grad",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# functional view of a model: other parameters and private buffers, same modules
# --------------------------------------------------------------------------------------------


class FunctionalView(nn.Module):
    """Calls ``model`` through ``torch.func.functional_call`` with substituted tensors.

    The model is not registered as a submodule (so ``view.parameters()`` is empty and nothing is
    copied); ``train()``/``eval()`` are forwarded to the model so that mode semantics are the
    model's own. Buffers passed in ``tensors`` are private clones (:func:`cloned_buffers`), so
    in-place buffer updates (BatchNorm running statistics, ``num_batches_tracked``) never reach
    the model.

    Args:
        model: the module to call.
        tensors: ``{name: tensor}`` of parameters and buffers to use instead of the model's own
            (names as in ``model.named_parameters()`` / ``named_buffers()``; missing ones are the
            model's).
    """

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_agc_model", model)
        object.__setattr__(self, "_agc_tensors", tensors)
        self.training = model.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the substituted tensors."""
        return functional_call(self._agc_model, self._agc_tensors, args, kwargs)

    def train(self, mode: bool = True) -> FunctionalView:
        """Set the model's mode (and report it as this view's)."""
        self._agc_model.train(mode)
        self.training = mode
        return self


def cloned_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: clone}`` of every buffer of ``model``: private buffers for a :class:`FunctionalView`."""
    return {name: b.clone() for name, b in model.named_buffers()}


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def scaled_grad(loss: Tensor, params: list[Tensor], scale: float | Tensor) -> list[Tensor]:
    """Gradient of ``loss`` w.r.t. ``params`` with loss scaling: ``grad(loss * s) / s``.

    ``s`` starts at ``scale`` and is halved (down to 1) while the result is not finite and ``loss``
    is; at ``s <= 1`` or with a non-finite loss the result is returned as it is (synchronises with
    the device once per try). Parameters the loss does not use get zeros.
    """
    s = scale
    loss_finite = bool(torch.isfinite(loss.detach()))
    while True:
        last = not loss_finite or float(s) <= 1.0
        grads = torch.autograd.grad(
            loss * s, params, retain_graph=not last, allow_unused=True, materialize_grads=True
        )
        grads = [g.div_(s) for g in grads]
        if last or all_finite(grads):
            return grads
        logger.info("AGC refresh: gradient overflow at loss scale %g, retrying at half", float(s))
        s = s / 2


@dataclass
class GradientPass:
    """What :func:`full_gradient_pass` collects over the refresh batches.

    Attributes:
        grad_sum: per parameter, the sum over batches of ``n_i * g_i`` (``n_i`` the batch size).
        a: per-batch losses at the current weights (float64, one per batch).
        b: per-batch losses at the previous snapshot (float64; empty without a snapshot view).
        examples: the number of examples seen.
        num_batches: the number of batches seen.
    """

    grad_sum: list[Tensor]
    a: Tensor
    b: Tensor
    examples: int
    num_batches: int


def full_gradient_pass(
    current_view: nn.Module,
    snap_view: nn.Module | None,
    params: list[Tensor],
    batches: Iterable[tuple[Tensor, ...]],
    loss_fn: Callable[..., Tensor],
    loss_scale: float | Tensor | None,
) -> GradientPass:
    """One pass over the refresh ``batches``: gradients at the current weights, losses at both points.

    For each batch (a tensor or a tuple of tensors): ``a_i = loss_fn(current_view, *batch)`` and its
    gradient ``g_i`` w.r.t. ``params`` (into fresh tensors, :func:`scaled_grad` with a
    ``loss_scale``), accumulated as ``n_i * g_i``; with a ``snap_view``, ``b_i`` = the loss at the
    previous snapshot (forward only). Call under ``torch.no_grad()``.

    Raises:
        ValueError: ``loss_fn`` does not return a scalar tensor.
    """
    acc = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    a_list: list[Tensor] = []
    b_list: list[Tensor] = []
    examples = 0
    num_batches = 0
    for batch in batches:
        if isinstance(batch, Tensor):
            batch = (batch,)
        n_i = int(batch[0].shape[0]) if batch[0].dim() > 0 else 1
        with torch.enable_grad():
            a_i = loss_fn(current_view, *batch)
            if not isinstance(a_i, Tensor) or a_i.numel() != 1:
                raise ValueError(f"Invalid loss_fn value: must return a scalar loss, got {a_i!r}")
            if loss_scale is None:
                g_i = torch.autograd.grad(a_i, params, allow_unused=True, materialize_grads=True)
            else:
                g_i = scaled_grad(a_i, params, loss_scale)
        torch._foreach_add_(acc, list(g_i), alpha=n_i)
        a_list.append(a_i.detach().reshape(()))
        if snap_view is not None:
            b_list.append(loss_fn(snap_view, *batch).detach().reshape(()))
        examples += n_i
        num_batches += 1
    a = torch.stack(a_list).double() if a_list else torch.zeros(0, dtype=torch.float64)
    b = torch.stack(b_list).double() if b_list else torch.zeros(0, dtype=torch.float64)
    return GradientPass(acc, a, b, examples, num_batches)


# --------------------------------------------------------------------------------------------
# reductions over the ranks of a data-parallel run
# --------------------------------------------------------------------------------------------


def dist_active(distributed: bool | None, process_group: Any) -> bool:
    """Whether to reduce over ``process_group``.

    ``distributed=False``: never; ``True``: always (``RuntimeError`` without an initialized
    ``torch.distributed``); ``None``: when ``torch.distributed`` is initialized with more than one
    process in the group.
    """
    if distributed is False:
        return False
    ok = dist.is_available() and dist.is_initialized()
    if distributed and not ok:
        raise RuntimeError(
            "distributed=True requires an initialized torch.distributed process group"
        )
    if distributed is None:
        return ok and dist.get_world_size(process_group) > 1
    return ok


def all_reduce_flat(tensors: list[Tensor], group: Any) -> None:
    """Sum ``tensors`` in place over ``group`` with one all-reduce per (device, dtype): the tensors
    are copied into one flat buffer (elementwise sums, so the result equals per-tensor calls)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_kind.values():
        if len(ts) == 1:
            dist.all_reduce(ts[0], group=group)
            continue
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def dist_reduce(
    a: Tensor,
    b: Tensor,
    acc: list[Tensor],
    total: Tensor,
    online: dict[str, Tensor],
    online_count: int,
    group: Any,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, dict[str, Tensor], int]:
    """All-reduce the refresh statistics (sum of example-weighted gradients, counts, online sums)
    and all-gather the per-batch losses over ``group``.

    With equal batch counts on every rank, batch ``i`` of every rank is a shard of one global batch
    and the returned ``a``/``b`` are the means over ranks (the statistics one process computes on
    the global batches); otherwise the per-rank batches are pooled. ``acc`` and the ``online``
    tensors are summed in place.

    Returns:
        ``(a, b, acc, total, online, online_count)`` reduced over the group (``total`` on the CPU).
    """
    device = acc[0].device if acc else a.device
    all_reduce_flat(acc, group)
    total_d = total.to(device)
    dist.all_reduce(total_d, group=group)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (a.cpu().tolist(), b.cpu().tolist()), group=group)
    if len({len(ga) for ga, _ in gathered}) == 1:
        # Data parallel: batch i of every rank is a shard of the same global batch (equal shards,
        # robust_agc.data.Batches), so the global batch's mean loss is the mean over ranks; this keeps
        # the loss-slope statistic the one a single process computes on the global batches.
        a = torch.tensor([ga for ga, _ in gathered], dtype=torch.float64).mean(0)
        b = torch.tensor([gb for _, gb in gathered], dtype=torch.float64).mean(0)
    else:  # unequal batch counts: no pairing across ranks, pool the per-rank batches
        a = torch.tensor([x for ga, _ in gathered for x in ga], dtype=torch.float64)
        b = torch.tensor([x for _, gb in gathered for x in gb], dtype=torch.float64)
    if online:
        all_reduce_flat(list(online.values()), group)
    count = torch.tensor(online_count, dtype=torch.int64, device=device)
    dist.all_reduce(count, group=group)
    return a, b, acc, total_d.cpu(), online, int(count)
