"""Per-layer density allocation for sparse initialisation: uniform, ER and ERK.

The allocation follows RigL (Evci et al. 2020, ``rigl/sparse_utils.py``):

- ``uniform``: every masked layer gets the target density.
- ``er`` (Erdos-Renyi): density proportional to ``(n_in + n_out) / (n_in * n_out)`` where
  ``n_out, n_in`` are the first two dimensions of the weight (kernel dimensions ignored).
- ``erk`` (Erdos-Renyi-Kernel): density proportional to ``sum(shape) / prod(shape)`` over all
  dimensions of the weight, kernel included.

For ``er``/``erk`` a single scale ``eps`` is solved so that the total number of active weights
equals the target; layers whose density ``eps * raw`` would exceed 1 become dense, and ``eps`` is
solved again for the remaining layers, repeated until consistent.

Densities are then turned into **exact integer counts**: dense layers get all their weights,
every other layer ``floor(d * n)`` or ``floor(d * n) + 1`` (largest remainder), so that the total
equals ``round(density * N)`` and each layer is within one weight of its allocation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DISTRIBUTIONS", "layer_densities", "layer_counts"]

#: Names accepted by :func:`layer_densities` and :func:`robust_agc.sparse.apply_masks`.
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "er", "erk")


def _validate(shapes: Sequence[Sequence[int]], density: float, distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Invalid distribution value: {distribution!r} (choose from {', '.join(DISTRIBUTIONS)})"
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"Invalid density value: {density!r} (expected a float)")
    if not 0.0 < density <= 1.0 or math.isnan(density):
        raise ValueError(f"Invalid density value: {density}")
    if len(shapes) == 0:
        raise ValueError("Invalid shapes value: [] (no layers to allocate)")
    for shape in shapes:
        if len(shape) < 2 or any(int(s) <= 0 for s in shape):
            raise ValueError(f"Invalid shape value: {tuple(shape)} (need >= 2 positive dims)")


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def layer_densities(
    shapes: Sequence[Sequence[int]], density: float, distribution: str = "erk"
) -> list[float]:
    """Per-layer densities whose weighted mean (by layer size) equals ``density``.

    Args:
        shapes: weight shapes of the masked layers, ``(out, in, *kernel)``.
        density: target global density in ``(0, 1]`` (``1 - sparsity``).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.

    Returns:
        One density in ``(0, 1]`` per layer, in the order of ``shapes``.
    """
    _validate(shapes, density, distribution)
    if distribution == "uniform" or density == 1.0:
        return [float(density)] * len(shapes)
    sizes = [math.prod(s) for s in shapes]
    raw = [_raw_score(s, distribution) for s in shapes]
    dense: set[int] = set()
    while True:
        # Budget of active weights for the non-dense layers, as in RigL: every layer contributes
        # its target count, and each dense layer takes its missing (would-be pruned) weights out.
        rhs = 0.0
        divisor = 0.0
        for i, n in enumerate(sizes):
            if i in dense:
                rhs -= n * (1.0 - density)
            else:
                rhs += n * density
                divisor += raw[i] * n
        if divisor == 0.0:  # every layer dense (only reachable for density == 1)
            break
        eps = rhs / divisor
        free = [i for i in range(len(sizes)) if i not in dense]
        max_raw = max(raw[i] for i in free)
        if max_raw * eps > 1.0:
            dense.update(i for i in free if raw[i] == max_raw)
            if len(dense) == len(sizes):  # pragma: no cover - impossible for density < 1
                break
            continue
        break
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(sizes))]


def layer_counts(
    shapes: Sequence[Sequence[int]], density: float, distribution: str = "erk"
) -> list[int]:
    """Exact number of active weights per layer for a target global ``density``.

    The total is ``round(density * N)`` (``N`` = total weights); each layer's count is within one
    weight of ``density_l * n_l`` from :func:`layer_densities` (largest-remainder rounding), and
    layers of density 1 are fully active.
    """
    dens = layer_densities(shapes, density, distribution)
    sizes = [math.prod(s) for s in shapes]
    target_total = round(density * sum(sizes))
    exact = [d * n for d, n in zip(dens, sizes)]
    counts = [n if d >= 1.0 else min(n, math.floor(e)) for d, n, e in zip(dens, sizes, exact)]
    missing = target_total - sum(counts)
    # Largest remainder: hand out the missing weights to the layers with the largest fractional
    # parts (ties by index for determinism); never above a layer's size.
    order = sorted(
        (i for i in range(len(sizes)) if counts[i] < sizes[i]),
        key=lambda i: (-(exact[i] - counts[i]), i),
    )
    for i in order:
        if missing <= 0:
            break
        counts[i] += 1
        missing -= 1
    return counts
