"""Gradient-variance probe: how much does AGC's correction reduce the minibatch gradient's variance?

At the current weights ``w``, for a fixed set of probe batches ``B_1..B_K``, the probe computes the
plain minibatch gradients ``g_k = g_{B_k}(w)`` and, when a gradient-correcting optimizer
(:class:`~robust_agc.optim.CorrectedOptimizer`, e.g. AGC) holds a snapshot, the corrected gradients
it would use on those batches (``docs/agc.md``, "The method")::

    v_k = g_k + c * (mu - g_{B_k}(ws))        (c, ws, mu: the optimizer's current state)

and reports the total variance over the batches, ``mean_k ||g_k - mean(g)||^2`` and the same for
``v_k``, summed over parameters (active positions only when masks are given). The corrected
gradient is an unbiased estimate of the same mean only in expectation over batches, so the two
means are reported too (their distance shows the correction's bias on the probe set).

Nothing is changed: gradients are computed with ``torch.autograd.grad`` through
``torch.func.functional_call`` with cloned buffers, so ``p.grad``, BatchNorm running statistics
and the optimizer state are untouched. Positions regrown since the last refresh get no correction,
as in :meth:`robust_agc.optim.AGC.snapshot_backward`. The optimizer is read through its public
interface only (``snapshot_of``, ``full_gradient_of``, ``stale_positions``, ``coefficient``).

This module used to be ``robust_agc.probe`` (still a re-exporting shim): it lives with the
optimizer because it measures the optimizer's own corrected gradient.

Example::

    from robust_agc.optim.probe import gradient_variance

    stats = gradient_variance(model, lambda m, x, y: F.cross_entropy(m(x), y), probe_batches,
                              optimizer=opt)
    print(stats["var_plain"], stats["var_corrected"], stats["ratio"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .passes import FunctionalView, cloned_buffers
from .protocol import CorrectedOptimizer, is_corrected

__all__ = ["gradient_variance"]


def _grads_at(
    model: nn.Module,
    params: list[tuple[str, Tensor]],
    values: list[Tensor],
    loss_fn: Callable[..., Tensor],
    batch: Sequence[Any],
) -> list[Tensor]:
    leaves = [v.detach().clone().requires_grad_(True) for v in values]
    tensors = cloned_buffers(model)
    tensors.update({n: leaf for (n, _), leaf in zip(params, leaves)})
    with torch.enable_grad():
        loss = loss_fn(FunctionalView(model, tensors), *batch)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [g.detach().double() for g in grads]


def _total_variance(rows: list[list[Tensor]]) -> tuple[float, list[Tensor]]:
    n = len(rows)
    mean = [torch.stack([r[i] for r in rows]).mean(0) for i in range(len(rows[0]))]
    var = sum(float(sum(((r[i] - mean[i]) ** 2).sum() for i in range(len(mean)))) for r in rows)
    return var / n, mean


@torch.no_grad()
def gradient_variance(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batches: Sequence[Sequence[Any]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    masks: dict[int, Tensor] | None = None,
) -> dict[str, float]:
    """Variance of the plain and (with an AGC optimizer holding a snapshot) corrected gradient.

    Args:
        model: the trained module (its parameters are the current weights ``w``); its mode is
            used as is (train mode: batch statistics, as in a training step).
        loss_fn: ``loss_fn(module, *batch) -> scalar loss``, called with a functional view of
            ``model`` in place of the model (like :meth:`AGC.snapshot_backward`'s closure).
        batches: at least two probe batches (each a tuple of ``loss_fn``'s arguments).
        optimizer: a :class:`~robust_agc.optim.CorrectedOptimizer` (``AGC`` or its SVRG form);
            without one (any other optimizer), or before its first refresh, only the plain
            variance is reported.
        masks: ``{id(param): bool mask}``: restrict the variance to active positions.

    Returns:
        ``var_plain``, ``mean_sq_plain`` (``||mean g||^2``), and with a snapshot also
        ``var_corrected``, ``mean_sq_corrected``, ``mean_dist`` (``||mean v - mean g||``),
        ``ratio`` (``var_corrected / var_plain``) and ``coef``; ``n_batches``.
    """
    if len(batches) < 2:
        raise ValueError(
            f"Invalid batches value: need at least 2 probe batches, got {len(batches)}"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    params = [(names[id(p)], p) for p in model.parameters() if p.requires_grad]
    weights = [p for _, p in params]
    keep = [None if masks is None else masks.get(id(p)) for p in weights]

    def restrict(gs: list[Tensor]) -> list[Tensor]:
        return [g if m is None else g * m.to(g.dtype) for g, m in zip(gs, keep)]

    plain = [restrict(_grads_at(model, params, weights, loss_fn, b)) for b in batches]
    var_plain, mean_plain = _total_variance(plain)
    out: dict[str, float] = {
        "n_batches": float(len(batches)),
        "var_plain": var_plain,
        "mean_sq_plain": float(sum((m**2).sum() for m in mean_plain)),
    }
    if optimizer is None or not is_corrected(optimizer):
        return out
    corr = cast(CorrectedOptimizer, optimizer)
    if not all(corr.snapshot_of(p) is not None for p in weights):
        return out  # before the first refresh
    coef = float(corr.coefficient)
    snaps = [cast(Tensor, corr.snapshot_of(p)) for p in weights]
    mus = [cast(Tensor, corr.full_gradient_of(p)).double() for p in weights]
    stale = [cast(Tensor, corr.stale_positions(p)) for p in weights]
    corrected = []
    for b, g in zip(batches, plain):
        s = _grads_at(model, params, snaps, loss_fn, b)
        s = [si.masked_fill(st, 0.0) for si, st in zip(s, stale)]
        v = [gi + coef * (mu - si) for gi, mu, si in zip(g, mus, s)]
        corrected.append(restrict(v))
    var_corr, mean_corr = _total_variance(corrected)
    dist = sum(float(((a - b) ** 2).sum()) for a, b in zip(mean_corr, mean_plain)) ** 0.5
    out.update(
        var_corrected=var_corr,
        mean_sq_corrected=float(sum((m**2).sum() for m in mean_corr)),
        mean_dist=dist,
        ratio=var_corr / var_plain if var_plain > 0 else float("nan"),
        coef=coef,
    )
    return out
