"""HYDRA's importance scores: a score per prunable weight, a straight-through top-k mask.

Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020 (arXiv
2002.10509); official code https://github.com/inspire-group/hydra (``models/layers.py``:
``GetSubnet``, ``SubnetConv``; ``utils/model.py``: ``initialize_scaled_score``, ``freeze_vars``).

- Every conv/linear weight ``w`` gets a score tensor ``s`` of its shape (a ``torch.nn.utils.
  parametrize`` parametrization of ``weight``), initialised as the official code's
  scaled-score-init: ``s = sqrt(6 / fan_in) * w / max|w|`` per layer (signed; the mask ranks
  ``|s|``, so it starts as the magnitude ranking of ``w``).
- Forward: ``weight = w * m`` with ``m`` the top-k of ``|s|`` (per layer at ``layer_counts``, or
  one global ranking: :func:`~robust_agc.prune.magnitude.top_masks`); backward is
  straight-through, ``d weight / d|s| = w``, as ``GetSubnet.backward`` returns ``g`` unchanged.
  The masks are cached and recomputed only when a score tensor changed (its version counter).
- The conv/linear weights and biases are frozen (``requires_grad = False``), normalisation
  layers stay trainable (the official ``freeze_vars`` default, ``freeze_bn=False``), so an
  optimizer built from the trainable parameters sees the scores and the norm layers only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..sparse import maskable_modules
from .magnitude import top_masks

__all__ = [
    "ScoreMasks",
    "ScoredWeight",
    "attach_scores",
    "fold_score_state",
    "scaled_score_init",
    "score_keys",
]

SCORE_SUFFIX = "parametrizations.weight.0.scores"
ORIGINAL_SUFFIX = "parametrizations.weight.original"


def scaled_score_init(weight: Tensor) -> Tensor:
    """HYDRA's scaled-score-init: ``sqrt(6 / fan_in) * w / max|w|`` (``fan_in`` = all dimensions
    but the first; a layer of zeros gets zero scores)."""
    fan_in = math.prod(weight.shape[1:])
    peak = weight.detach().abs().max()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return math.sqrt(6.0 / fan_in) * weight.detach() / peak


class ScoreMasks:
    """The shared rule of one model's scores: density, allocation and the cached top-k masks."""

    def __init__(self, density: float, *, distribution: str, scope: str) -> None:
        self.density = float(density)
        self.distribution = distribution
        self.scope = scope
        self.layers: list[ScoredWeight] = []
        self._cache: tuple[tuple[int, ...], list[Tensor]] | None = None

    def masks(self) -> list[Tensor]:
        """The current bool masks, one per scored layer (top-k of ``|scores|``)."""
        key = tuple(v for p in self.layers for v in (id(p.scores), p.scores._version))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                ms = top_masks(
                    [p.scores.abs() for p in self.layers],
                    self.density,
                    distribution=self.distribution,
                    scope=self.scope,
                )
            self._cache = (key, ms)
        return self._cache[1]


class ScoredWeight(nn.Module):
    """The parametrization ``weight -> weight * topk(|scores|)`` with a straight-through gradient
    to the scores (``scores`` is this module's parameter)."""

    def __init__(self, weight: Tensor, group: ScoreMasks) -> None:
        super().__init__()
        self.scores = nn.Parameter(scaled_score_init(weight))
        self.index = len(group.layers)
        self._group = [group]  # a list, so the group is not a submodule
        group.layers.append(self)

    def forward(self, weight: Tensor) -> Tensor:
        mask = self._group[0].masks()[self.index].to(weight.dtype)
        a = self.scores.abs()
        return weight * (mask + (a - a.detach()))


def attach_scores(
    model: nn.Module,
    *,
    density: float,
    distribution: str = "uniform",
    scope: str = "layerwise",
    dense_first_layer: bool = False,
) -> ScoreMasks:
    """Parametrise every conv/linear weight of ``model`` with HYDRA scores and freeze the
    conv/linear weights and biases (see the module docstring); returns the shared
    :class:`ScoreMasks`. ``dense_first_layer`` leaves the first layer unscored (all kept)."""
    layers = maskable_modules(model)
    group = ScoreMasks(density, distribution=distribution, scope=scope)
    for i, (_, m) in enumerate(layers):
        for p in (m.weight, getattr(m, "bias", None)):
            if isinstance(p, Tensor):
                p.requires_grad_(False)
        if dense_first_layer and i == 0:
            continue
        parametrize.register_parametrization(
            m, "weight", ScoredWeight(m.weight, group), unsafe=True
        )
    if not group.layers:
        raise ValueError("Invalid model value: no conv/linear weight to score")
    return group


def score_keys(state: dict[str, Tensor]) -> list[str]:
    """The module names carrying HYDRA scores in a state dict, in its order."""
    return [k[: -len(SCORE_SUFFIX) - 1] for k in state if k.endswith("." + SCORE_SUFFIX)]


def fold_score_state(
    state: dict[str, Tensor], *, density: float, distribution: str, scope: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A score run's state dict -> ``(plain state dict, {module name: mask})``: each scored
    weight becomes ``original * topk(|scores|)`` under its plain name, the scores are dropped."""
    names = score_keys(state)
    masks = top_masks(
        [state[f"{n}.{SCORE_SUFFIX}"].abs() for n in names],
        density,
        distribution=distribution,
        scope=scope,
    )
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.endswith("." + SCORE_SUFFIX):
            continue
        if k.endswith("." + ORIGINAL_SUFFIX):
            k = k[: -len(ORIGINAL_SUFFIX)] + "weight"
        out[k] = v
    by_name = dict(zip(names, masks))
    for n, m in by_name.items():
        w = out[f"{n}.weight"]
        out[f"{n}.weight"] = torch.where(m, w, torch.zeros((), dtype=w.dtype))
    return out, by_name
