"""Topology schedulers for filter and channel masks (:class:`~robust_agc.sparse.StructuredMasks`).

``static`` keeps the channels; ``rigl`` is RigL (Evci et al. 2020, https://arxiv.org/abs/1911.11134)
at channel granularity, registered under the same name for ``filter`` and ``channel`` masks
(:func:`~robust_agc.sparse.create_scheduler` picks it from the masks' ``structure``). On an update
step (the schedule, cosine-decayed fraction and exact counts of
:class:`~robust_agc.sparse.schedulers.base.TopologyScheduler`) each coupled group drops the ``k``
kept channels whose masked weights have the smallest summed L1 norm and regrows ``k`` channels
(just-dropped ones included) of largest gradient score, so every group keeps its channel count:

- ``channel``: the L1 norm of the **dense** gradient of the consumers' masked input slices (the
  masks' pre-hook stashes it, as for RigL); regrown slices start at zero with zero state, as in
  RigL.
- ``filter``: a removed filter's own dense gradient is exactly zero (its BatchNorm weight is zero,
  and ReLU's derivative at 0 is 0), so the score is the L1 norm of the loss gradient with respect
  to the channel's activation where its consumers read it (their unmasked input slices still
  weigh it): the signal of first-order channel saliency (Molchanov et al. 2017,
  https://arxiv.org/abs/1611.06440). It is captured by tensor hooks on the consumers' inputs in
  the first forward with trainable weights (attacks freeze them) after the previous step, only
  before update steps, and summed over ranks. A regrown filter would stay dead at zero weights
  (BatchNorm then ReLU at exactly 0 pass no gradient), so its weights are re-drawn He-normal
  (fan-in, ReLU gain) from the scheduler's seeded generator, its bias is zero, its BatchNorm
  weight 1, bias 0, running statistics 0/1, and its optimizer state zero.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..masks import EVER_BUFFER, MASK_BUFFER, fill_state
from ..structured import STRUCTURES, GroupSlice, StructuredMasks
from .base import SPARSE_METHOD_DEFAULTS, TopologyScheduler, register_sparse_method
from .dst import build_drop_and_grow

__all__ = ["StructuredRigLScheduler", "build_structured_rigl"]


def _per_channel(t: Tensor, dim: int) -> Tensor:
    """Sum of ``|t|`` over every dimension but ``dim`` (float64 on the CPU)."""
    t = t.detach().abs().double()
    return t.transpose(0, dim).reshape(t.shape[dim], -1).sum(1).cpu()


class StructuredRigLScheduler(TopologyScheduler):
    """RigL over the channels of coupled groups (see the module doc)."""

    uses_random = True  # filter regrowth re-draws weights

    def __init__(self, masks: StructuredMasks, **kwargs: Any) -> None:
        if not isinstance(masks, StructuredMasks):
            raise TypeError(f"Invalid masks value: {type(masks).__name__} (need StructuredMasks)")
        self.needs_dense_grad = masks.structure == "channel"
        self._handles: list[RemovableHandle] = []
        self._hooked: set[tuple[int, int]] = set()
        self._act_grads: dict[int, Tensor] = {}
        super().__init__(masks, **kwargs)
        self.masks: StructuredMasks = masks
        self._arm_if_needed()

    # ------------------------------------------------------------------ filter: activation grads
    def _arm_if_needed(self) -> None:
        """Before an update step of ``filter`` masks, hook the consumers' forward passes."""
        if self.masks.structure != "filter" or not self.is_update_step(self.step_count + 1):
            return
        self._disarm()
        for gi, g in enumerate(self.masks.groups):
            for si, s in enumerate(g.consumers):
                hook = partial(self._on_forward, gi, si, s)
                self._handles.append(s.module.register_forward_hook(hook))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked, self._act_grads = [], set(), {}

    def _on_forward(
        self, gi: int, si: int, s: GroupSlice, module: nn.Module, inputs: Any, output: Any
    ) -> None:
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if (gi, si) in self._hooked or not isinstance(x, Tensor) or not x.requires_grad:
            return
        if not module.weight.requires_grad or not torch.is_grad_enabled():
            return  # an attack's pass (parameters frozen) or evaluation
        self._hooked.add((gi, si))
        x.register_hook(partial(self._on_grad, gi, s))

    def _on_grad(self, gi: int, s: GroupSlice, grad: Tensor) -> None:
        per_pos = _per_channel(grad, 1)
        size = self.masks.groups[gi].size
        acc = self._act_grads.setdefault(gi, torch.zeros(size, dtype=torch.float64))
        acc.index_add_(0, s.root, per_pos[s.index])

    # ------------------------------------------------------------------ scores
    def _grow_scores_of(self, gi: int, dense: list[Tensor | None] | None) -> Tensor:
        g = self.masks.groups[gi]
        if self.masks.structure == "filter":
            score = self._act_grads.get(gi)
            if score is None:
                warnings.warn(
                    f"rigl (filter): no activation gradient reached group {g.root!r}; "
                    "regrowth there is arbitrary",
                    stacklevel=4,
                )
                return torch.zeros(g.size, dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                dev = self.masks.weights()[0].device
                score = score.to(dev)
                torch.distributed.all_reduce(score)
            return score.cpu()
        out = torch.zeros(g.size, dtype=torch.float64)
        index = {id(w): i for i, w in enumerate(self.masks.weights())}
        for s in g.consumers:
            grad = None if dense is None else dense[index[id(s.module.weight)]]
            if grad is not None:
                out.index_add_(0, s.root, _per_channel(grad, s.dim)[s.index])
        return out

    def _drop_scores_of(self, gi: int) -> Tensor:
        g = self.masks.groups[gi]
        out = torch.zeros(g.size, dtype=torch.float64)
        for s in g.members(self.masks.structure):
            out.index_add_(0, s.root, _per_channel(s.module.weight, s.dim)[s.index])
        return out

    def _dense_grads(self) -> list[Tensor | None] | None:
        if self.masks.structure != "channel":
            return None
        grads = self.masks.pop_dense_grads()
        if grads is None:  # not attached: p.grad was never masked
            grads = [None if w.grad is None else w.grad.detach() for w in self.masks.weights()]
        return grads

    # ------------------------------------------------------------------ update
    def step(self) -> dict[str, Any] | None:
        """Count one step; on update steps drop and regrow channels; arm the next capture."""
        out = super().step()
        self._arm_if_needed()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore (see the base class), then arm the capture for the restored step count."""
        super().load_state_dict(state_dict)
        self._disarm()
        self._arm_if_needed()

    @torch.no_grad()
    def _update(self, t: int) -> dict[str, Any]:
        frac = self.drop_fraction_at(t)
        dense = self._dense_grads()
        per_group: dict[str, dict[str, int]] = {}
        moved = changed = 0
        for gi, g in enumerate(self.masks.groups):
            kept = self.masks.kept_channels(gi)
            n_active = int(kept.sum())
            k = int(frac * n_active)
            if k == 0 or n_active == g.size:
                per_group[g.root] = {"dropped": 0, "grown": 0, "changed": 0}
                continue
            drop = self._drop_scores_of(gi).masked_fill(~kept, math.inf)
            remaining = kept.clone()
            remaining[torch.topk(drop, k, largest=False, sorted=False).indices] = False
            grow = torch.nan_to_num(self._grow_scores_of(gi, dense), nan=-math.inf)
            new = remaining.clone()
            new[torch.topk(grow.masked_fill(remaining, -math.inf), k, sorted=False).indices] = True
            self._reset_channels(gi, ~remaining, new & ~remaining)
            self.masks.set_kept_channels(gi, new)
            n_changed = int((new & ~kept).sum())
            per_group[g.root] = {"dropped": k, "grown": k, "changed": n_changed}
            moved, changed = moved + k, changed + n_changed
        for m in self.masks.modules:
            getattr(m, EVER_BUFFER).logical_or_(getattr(m, MASK_BUFFER))
        self.masks.apply_()
        self._disarm()
        summary = {
            "step": t,
            "drop_fraction": frac,
            "dropped": moved,
            "grown": moved,
            "changed": changed,
            "changed_fraction": changed / max(1, sum(self.masks.channel_counts().values())),
            "exploration_rate": self.masks.exploration_rate,
            "per_group": per_group,
        }
        self.history.append(summary)
        return summary

    def _reset_channels(self, gi: int, inactive: Tensor, regrown: Tensor) -> None:
        """Zero weights, gradients and state at ``inactive`` channels' masked slices; for
        ``filter``, re-draw the ``regrown`` filters and reset their BatchNorm and biases."""
        g = self.masks.groups[gi]
        optimizers = self._optimizers()
        filt = self.masks.structure == "filter"
        touched: list[tuple[nn.Parameter, int, Tensor]] = []
        for s in g.members(self.masks.structure):
            touched.append((s.module.weight, s.dim, s.positions(inactive)))
            if filt and isinstance(s.module.bias, nn.Parameter):
                touched.append((s.module.bias, 0, s.positions(inactive)))
        if filt:
            for s in g.norms:
                touched += [(s.module.weight, 0, s.positions(inactive))]
                touched += [(s.module.bias, 0, s.positions(inactive))]
        for p, dim, pos in touched:
            zero_at = torch.zeros(p.shape[dim], dtype=torch.bool, device=p.device)
            zero_at[pos.to(p.device)] = True
            shape = [1] * p.ndim
            shape[dim] = -1
            zero_at = zero_at.view(shape).expand_as(p)
            p.masked_fill_(zero_at, 0)
            if p.grad is not None:
                p.grad.masked_fill_(zero_at, 0)
            for opt in optimizers:
                state = opt.state.get(p)
                if state:
                    fill_state(state, p.shape, zero_at)
        if filt and bool(regrown.any()):
            self._redraw(gi, regrown)

    def _redraw(self, gi: int, regrown: Tensor) -> None:
        g = self.masks.groups[gi]
        for s in g.producers:
            w = s.module.weight
            pos = s.positions(regrown)
            fan_in = w[0].numel()
            fresh = torch.randn((len(pos), *w.shape[1:]), generator=self.generator)
            w.index_copy_(0, pos.to(w.device), (fresh * math.sqrt(2.0 / fan_in)).to(w))
        for s in g.norms:
            pos = s.positions(regrown)
            s.module.weight.index_fill_(0, pos.to(s.module.weight.device), 1.0)
        none = [torch.zeros(h.size, dtype=torch.bool) for h in self.masks.groups]
        none[gi] = regrown
        self.masks.reset_norm_stats_(none)


def build_structured_rigl(
    masks: StructuredMasks,
    *,
    method: str,
    total_steps: int,
    generator: torch.Generator | int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    update_interval: int | None = None,
    drop_fraction: float | None = None,
    update_end: float | None = None,
) -> TopologyScheduler:
    """The :func:`~robust_agc.sparse.create_scheduler` builder of ``rigl`` for structured masks
    (RigL's options; unset ones take :data:`SPARSE_METHOD_DEFAULTS` ``["rigl"]``)."""
    d = SPARSE_METHOD_DEFAULTS[method]
    return StructuredRigLScheduler(
        masks,
        method=method,
        total_steps=total_steps,
        update_interval=int(d["update_interval"]) if update_interval is None else update_interval,
        drop_fraction=float(d["drop_fraction"]) if drop_fraction is None else drop_fraction,
        update_end=float(d["update_end"]) if update_end is None else update_end,
        generator=generator,
        optimizer=optimizer,
    )


for _structure in STRUCTURES[1:]:
    register_sparse_method("static", build_drop_and_grow, structure=_structure)
    register_sparse_method("rigl", build_structured_rigl, structure=_structure)
