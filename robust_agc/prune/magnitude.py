"""Mask selection by magnitude: LWM (least weight magnitude) and IMP's schedule of densities.

Every selection here is a top-``k``: the ``k`` largest values are kept, the rest pruned, with
``k`` exact. Layerwise selection takes each layer's ``k`` from
:func:`robust_agc.sparse.layer_counts` (``uniform``, ``er`` or ``erk``, the same counts as
sparse training from scratch); global selection ranks every value of every layer together and
keeps ``round(density * N)``. ``allowed`` restricts the selection to positions that are still
active (a sparse source is pruned further, never regrown).

LWM: Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS
2015, the magnitude baseline of Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural
Networks", NeurIPS 2020 (arXiv 2002.10509). IMP: Frankle and Carbin, "The Lottery Ticket
Hypothesis", ICLR 2019 (arXiv 1803.03635), with rewinding as in Frankle et al., "Linear Mode
Connectivity and the Lottery Ticket Hypothesis", ICML 2020 (arXiv 1912.05671).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..sparse import EVER_BUFFER, MASK_BUFFER, SparseMasks, layer_counts

__all__ = ["SCOPES", "imp_densities", "magnitude_masks", "register_masks", "top_masks"]

#: Accepted ``scope`` values: per-layer counts, or one ranking over all layers.
SCOPES: tuple[str, ...] = ("layerwise", "global")


def _check(density: float, scope: str, n_layers: int) -> None:
    if isinstance(density, bool) or not 0.0 < float(density) <= 1.0 or math.isnan(density):
        raise ValueError(f"Invalid density value: {density}")
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope value: {scope!r} (choose from {', '.join(SCOPES)})")
    if n_layers == 0:
        raise ValueError("Invalid values value: [] (no layers)")


def top_masks(
    values: Sequence[Tensor],
    density: float,
    *,
    distribution: str = "uniform",
    scope: str = "layerwise",
    allowed: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Bool masks keeping the largest ``values``: exact counts per layer or in total.

    Args:
        values: one tensor per layer (importance: ``|w|`` for LWM, ``|scores|`` for HYDRA).
        density: fraction kept, in ``(0, 1]``.
        distribution: per-layer allocation of the layerwise scope (``uniform``, ``er``, ``erk``).
        scope: ``layerwise`` (each layer keeps its count from
            :func:`~robust_agc.sparse.layer_counts`) or ``global`` (``round(density * N)`` over
            all layers together).
        allowed: optional bool tensor per layer; only those positions can be kept.

    Returns:
        One bool tensor per layer, shaped like ``values``; ties at the boundary are broken by
        ``torch.topk`` (deterministic on CPU).

    Raises:
        ValueError: a layer (or, global, the model) has fewer allowed positions than its count.
    """
    _check(density, scope, len(values))
    flat = [v.detach().reshape(-1).float() for v in values]
    if allowed is not None:
        if len(allowed) != len(values):
            raise ValueError(f"Invalid allowed value: {len(allowed)} masks for {len(values)}")
        ninf = torch.tensor(-math.inf)
        flat = [
            torch.where(a.reshape(-1).to(f.device), f, ninf.to(f.device))
            for f, a in zip(flat, allowed)
        ]
    if scope == "global":
        total = round(float(density) * sum(f.numel() for f in flat))
        cat = torch.cat(flat)
        _check_available(cat, total, "the model")
        keep = torch.zeros(cat.numel(), dtype=torch.bool, device=cat.device)
        keep[torch.topk(cat, total, sorted=False).indices] = True
        parts = keep.split([f.numel() for f in flat])
    else:
        counts = layer_counts([tuple(v.shape) for v in values], float(density), distribution)
        parts = []
        for i, (f, k) in enumerate(zip(flat, counts)):
            _check_available(f, k, f"layer {i}")
            keep = torch.zeros(f.numel(), dtype=torch.bool, device=f.device)
            keep[torch.topk(f, k, sorted=False).indices] = True
            parts.append(keep)
    return [p.view(v.shape).to(v.device) for p, v in zip(parts, values)]


def _check_available(flat: Tensor, k: int, where: str) -> None:
    available = int(torch.isfinite(flat).sum()) if flat.numel() else 0
    if k > available:
        raise ValueError(
            f"Invalid density value: {where} keeps {k} weights but only {available} are active"
        )


def magnitude_masks(
    weights: Sequence[Tensor],
    density: float,
    *,
    distribution: str = "uniform",
    scope: str = "layerwise",
    allowed: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """LWM: keep the largest ``|w|`` (see :func:`top_masks` for the arguments)."""
    return top_masks(
        [w.detach().abs() for w in weights],
        density,
        distribution=distribution,
        scope=scope,
        allowed=allowed,
    )


def imp_densities(target: float, rounds: int, *, start: float = 1.0) -> list[float]:
    """IMP's geometric schedule: round ``r`` of ``N`` keeps ``start * (target / start) ** (r / N)``
    (``target ** (r / N)`` from a dense source), the last round exactly ``target``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"Invalid rounds value: {rounds}")
    if not 0.0 < target <= start <= 1.0:
        raise ValueError(f"Invalid target value: {target} (start density {start})")
    out = [start * (target / start) ** (r / rounds) for r in range(1, rounds)]
    return [*out, float(target)]


def register_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> SparseMasks:
    """Register given bool masks (``{module name: mask}``) as the ``weight_mask`` buffers of
    ``model`` and return their :class:`~robust_agc.sparse.SparseMasks` (pruned weights zeroed):
    the sparse layer's one mask mechanism, with masks chosen by pruning instead of at random."""
    modules = dict(model.named_modules())
    layers = []
    for name, mask in masks.items():
        m = modules.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), Tensor):
            raise ValueError(f"Invalid masks value: {name!r} is not a layer of the model")
        if tuple(mask.shape) != tuple(m.weight.shape):
            raise ValueError(
                f"Invalid masks value: {name!r} mask shape {tuple(mask.shape)} != "
                f"{tuple(m.weight.shape)}"
            )
        mask = mask.to(device=m.weight.device, dtype=torch.bool).clone()
        m.register_buffer(MASK_BUFFER, mask, persistent=True)
        m.register_buffer(EVER_BUFFER, mask.clone(), persistent=False)
        layers.append((name, m))
    out = SparseMasks(model, layers)
    out.apply_()
    return out
