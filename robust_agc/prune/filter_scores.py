"""HYDRA's importance scores at filter granularity: a score per channel of every coupled filter
group, a straight-through top-k gate on the channel's normalised output.

HYDRA (Sehwag et al., NeurIPS 2020, arXiv 2002.10509; :mod:`robust_agc.prune.scores` for the
per-weight version) learns a score per weight with the weights frozen, uses the top-k of the
scores as the mask in the forward pass, and passes the gradient straight through to the scores:
``dL/ds_i = dL/dw_eff_i * w_i``. Its authors' code has no structured variant. Here:

- **Where the score acts.** A filter's score cannot simply scale the filter's weights: a removed
  filter outputs zero, the BatchNorm after it normalises a constant (variance 0), and once the
  removed channel's BatchNorm weight is zero, as in the pruned network, no gradient reaches the
  score (the reason the weight-level estimator gives nothing for filters); gating the producer's
  output does no better, since a ReLU right after it passes no gradient at exactly zero. So each
  channel ``c`` of a group is multiplied by the gate ``m_c + (|s_c| - sg(|s_c|))`` (``m`` the top-k
  of ``|s|``, ``sg`` stop-gradient: forward value ``m_c``) where every *consumer* of the group
  (each conv/linear layer whose input holds the channel, through residual sums and flattening)
  reads it. Every path from the channel to the output ends in such a consumer, so the forward pass
  computes exactly the filter-pruned network's function (whose removed filters, BatchNorm
  parameters and biases are zero: :class:`~robust_agc.sparse.StructuredMasks`), and the
  straight-through gradient of a channel's score is ``sum dL/dx_c * x_c`` over the batch, the
  positions and the consumers, ``x_c`` what the consumer would read ungated: the first-order
  (Taylor) importance of the channel, defined for kept and removed channels alike.
- **Groups and counts** are the structured masks' (:func:`~robust_agc.sparse.coupled_groups`,
  :func:`~robust_agc.sparse.group_keep_counts`: exact counts, residual sums as one group, the
  output layer's group never pruned), so folding the scores gives the masks
  :func:`~robust_agc.sparse.apply_structured_masks` registers for the fine-tuning stage.
- **Initialisation** (the analogue of HYDRA's scaled-score-init): ``s_c = sqrt(6 / fan_in) * n_c /
  max n``, ``n_c`` the channel's summed L1 norm over its producers (Li et al. 2017's ranking) and
  ``fan_in`` that of the group's first producer: the first mask is L1 filter pruning's.
- **Frozen:** every conv/linear weight and bias (``requires_grad = False``); BatchNorm stays
  trainable, as HYDRA's ``freeze_bn=False`` default. The scores live in the model's
  ``hydra_filter_scores`` submodule, so checkpoints and ``--resume`` carry them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..models import model_from_config
from ..sparse import (
    MASK_BUFFER,
    apply_structured_masks,
    coupled_groups,
    filter_l1_norms,
    group_keep_counts,
    maskable_modules,
)

__all__ = [
    "FILTER_SCORES",
    "FilterScores",
    "attach_filter_scores",
    "filter_score_tensors",
    "fold_filter_score_state",
]

FILTER_SCORES = "hydra_filter_scores"
"""The submodule (and state-dict prefix) holding a model's filter scores."""


class FilterScores(nn.Module):
    """The scores of one model's filter groups and their cached top-k masks.

    Attributes:
        scores: one parameter per group, a score per channel.
        counts: channels kept per group.
    """

    def __init__(self, init: Sequence[Tensor], counts: Sequence[int]) -> None:
        super().__init__()
        self.scores = nn.ParameterList([nn.Parameter(t.clone()) for t in init])
        self.counts = [int(k) for k in counts]
        self.handles: list[RemovableHandle] = []
        self._cache: tuple[tuple[int, ...], list[Tensor]] | None = None

    def masks(self) -> list[Tensor]:
        """The bool masks (top-``counts[i]`` of ``|scores[i]|``), recomputed when a score changed."""
        key = tuple(v for s in self.scores for v in (id(s), s._version))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                out = []
                for s, k in zip(self.scores, self.counts):
                    m = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
                    m[torch.topk(s.abs(), k, sorted=False).indices] = True
                    out.append(m)
            self._cache = (key, out)
        return self._cache[1]

    def gate(self, i: int) -> Tensor:
        """Group ``i``'s gate: the mask in value, the straight-through gradient to its scores."""
        a = self.scores[i].abs()
        return self.masks()[i].to(a.dtype) + (a - a.detach())


def attach_filter_scores(
    model: nn.Module,
    *,
    density: float,
    input_shape: Sequence[int],
    distribution: str = "uniform",
    dense_first_layer: bool = False,
) -> FilterScores:
    """Give ``model`` HYDRA filter scores (see the module docstring) kept at ``density`` (a
    fraction of each group's channels, counts as the structured masks'), gate every consumer's
    input, freeze the conv/linear weights and biases; returns the :class:`FilterScores` (also
    ``model.hydra_filter_scores``)."""
    groups = coupled_groups(model, input_shape, dense_first_layer=dense_first_layer)
    if not groups:
        raise ValueError("Invalid model value: no prunable filter group")
    counts = group_keep_counts(groups, "filter", float(density), distribution)
    init = []
    for g in groups:
        norms = filter_l1_norms(g)
        fan_in = math.prod(g.producers[0].module.weight.shape[1:])
        peak = norms.max() if norms.max() > 0 else torch.ones(())
        init.append((math.sqrt(6.0 / fan_in) * norms / peak).float())
    ref = next(model.parameters())
    scores = FilterScores([t.to(ref.device) for t in init], counts)
    for _, m in maskable_modules(model):
        for p in (m.weight, getattr(m, "bias", None)):
            if isinstance(p, Tensor):
                p.requires_grad_(False)
    for i, g in enumerate(groups):
        for s in g.consumers:
            hook = _gate_hook(scores, i, s.index, s.root)
            scores.handles.append(s.module.register_forward_pre_hook(hook))
    model.add_module(FILTER_SCORES, scores)
    return scores


def _gate_hook(scores: FilterScores, i: int, index: Tensor, root: Tensor) -> Any:
    """A forward pre-hook multiplying input channels ``index`` (dimension 1) of a consumer by
    group ``i``'s gate at ``root``."""

    def hook(m: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inputs[0]
        gate = scores.gate(i)
        full = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        full = full.index_put((index.to(x.device),), gate[root.to(gate.device)].to(x.dtype))
        return (x * full.view(1, -1, *([1] * (x.dim() - 2))), *inputs[1:])

    return hook


def filter_score_tensors(state: dict[str, Tensor]) -> list[Tensor] | None:
    """The filter scores of a state dict, in group order (``None``: it has none)."""
    prefix = f"{FILTER_SCORES}.scores."
    keys = [k for k in state if k.startswith(prefix)]
    if not keys:
        return None
    return [state[f"{prefix}{i}"] for i in range(len(keys))]


def fold_filter_score_state(
    state: dict[str, Tensor], cfg: dict[str, Any], widths: dict[str, int] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A filter-score run's state dict -> ``(plain state dict, {layer name: weight mask})``: the
    network of its config with the top-k filters of each group kept and the rest removed as
    :class:`~robust_agc.sparse.StructuredMasks` removes them (weights, BatchNorm parameters and
    biases zero, running statistics reset), the scores dropped."""
    scores = filter_score_tensors(state)
    if scores is None:
        raise ValueError("no filter scores in the state dict")
    model = model_from_config(cfg, widths)
    plain = {k: v.cpu() for k, v in state.items() if not k.startswith(FILTER_SCORES + ".")}
    model.load_state_dict(plain, strict=True)
    size = int(cfg["input_size"])
    apply_structured_masks(
        model,
        sparsity=float(cfg["sparsity"]),
        structure="filter",
        input_shape=(int(cfg["in_channels"]), size, size),
        distribution=str(cfg.get("sparse_init", "uniform")),
        dense_first_layer=bool(cfg.get("dense_first_layer", False)),
        rescale_init=False,
        channel_scores=[s.abs().cpu() for s in scores],
    )
    masks = {
        n: getattr(m, MASK_BUFFER).clone()
        for n, m in maskable_modules(model)
        if hasattr(m, MASK_BUFFER)
    }
    out = {
        k: v for k, v in model.state_dict().items() if not k.split(".")[-1].startswith(MASK_BUFFER)
    }
    return out, masks
