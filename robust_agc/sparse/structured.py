"""Structured (filter and channel) sparsity: coupled channel groups, masks and their enforcement.

A structured mask is an ordinary ``weight_mask`` buffer (:mod:`robust_agc.sparse.masks`) whose
pruned positions are whole slices of the weight, so :class:`~robust_agc.sparse.SparseMasks`'
optimizer hooks already keep weights, gradients and every same-shaped optimizer-state tensor at
zero there. Two structures (``docs/usage.md``, "Structured sparsity"):

- ``filter``: whole output channels (conv filters, rows of a linear layer) of the *producers* of
  a channel; the BatchNorm weight and bias of a removed channel and the producers' biases are
  kept at zero too (values, gradients and same-shaped optimizer state) by extra step hooks that
  :meth:`StructuredMasks.attach` registers right after the masks' own. A removed filter then
  outputs exactly zero through BatchNorm and ReLU, so :func:`export_structured` can delete it.
- ``channel``: whole input channels (conv input slices, columns of a linear layer) of the
  *consumers* of a channel. The producers keep computing the unused channel (dead compute that
  the export removes); BatchNorm is left alone, so the dense gradient of a masked column is
  nonzero and RigL can regrow it.

**Coupling.** Channels are chosen per *group* of coupled layers, found by torch-pruning's
``DependencyGraph`` (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023;
https://github.com/VainF/Torch-Pruning, ``torch_pruning/dependency/graph.py``: ``build_dependency``,
``get_all_groups``, ``get_pruning_group``): a group holds every layer whose output or input
dimension must lose the same channel, through residual additions, flattening and normalisation
layers (in a ResNet stage, the stem or first shortcut and every block's last conv feed one sum, so
they form one group with every BatchNorm and conv that reads that sum). The group of the network's
output layer (the last conv/linear in registration order) is never pruned.

**Counts.** Per-layer densities come from :func:`~robust_agc.sparse.distributions.layer_densities`
over the layers the structure masks (producers for ``filter``, consumers for ``channel``); a group
of ``n`` channels keeps ``k = min(n, max(1, round(d * n)))`` of them, ``d`` the size-weighted mean
density of its masked layers (``uniform``: ``d`` is the target density). Every masked layer of the
group then has exactly ``k`` active filters (channels). Sparsity is thus a fraction of channels:
at 50% filter sparsity about half the filters go, and the exported network, whose next layers
also lose those input channels, keeps about a quarter of the weights of its middle layers.

**Running statistics** of a removed channel's BatchNorm are reset to a fresh layer's (mean 0,
variance 1) when masks are applied or regrown; in between they drift with the (zero) batch
statistics, which changes nothing: with weight and bias at zero the channel outputs zero in both
modes.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributions import layer_densities
from .masks import MASK_BUFFER, SparseMasks, check_generator, check_mask_args, maskable_modules

__all__ = [
    "CRITERIA",
    "NORM_TYPES",
    "STRUCTURES",
    "ChannelGroup",
    "GroupSlice",
    "StructuredMasks",
    "apply_structured_masks",
    "coupled_groups",
    "filter_l1_norms",
    "group_keep_counts",
    "l1_filter_masks",
    "torch_pruning",
]

logger = logging.getLogger(__name__)

#: Accepted ``structure`` values; ``unstructured`` is :func:`~robust_agc.sparse.apply_masks`.
STRUCTURES: tuple[str, ...] = ("unstructured", "filter", "channel")
#: How :func:`apply_structured_masks` chooses the kept channels of each group.
CRITERIA: tuple[str, ...] = ("random", "l1")
#: Normalisation layers a group may hold (their per-channel weight and bias are handled).
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(eq=False)
class GroupSlice:
    """One layer's share of a channel group: positions ``index`` along ``dim`` of its weight
    (0: output channels, 1: input channels), ``root[i]`` the group channel of ``index[i]``
    (several positions per channel after a flatten)."""

    name: str
    module: nn.Module
    dim: int
    index: Tensor
    root: Tensor

    def positions(self, channels: Tensor) -> Tensor:
        """The positions (along ``dim``) that belong to the bool-selected group ``channels``."""
        return self.index[channels[self.root]]


@dataclass(eq=False)
class ChannelGroup:
    """Coupled layers that lose the same ``size`` channels together (see the module doc)."""

    root: str
    size: int
    producers: list[GroupSlice] = field(default_factory=list)
    consumers: list[GroupSlice] = field(default_factory=list)
    norms: list[GroupSlice] = field(default_factory=list)

    def members(self, structure: str) -> list[GroupSlice]:
        """The slices a ``structure`` masks: producers (``filter``) or consumers (``channel``)."""
        return self.producers if structure == "filter" else self.consumers


def torch_pruning() -> Any:
    """The ``torch_pruning`` module (imported on first use; its import-time ``FutureWarning``
    about ``torch.jit.interface`` is torch's deprecation notice to torch-pruning, not to us)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        import torch_pruning as tp
    return tp


def _check_structure(structure: str) -> None:
    if structure not in STRUCTURES[1:]:
        raise ValueError(
            f"Invalid structure value: {structure!r} (choose from {', '.join(STRUCTURES[1:])})"
        )


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    shape = tuple(input_shape)
    if len(shape) == 0 or any(
        isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape
    ):
        raise ValueError(f"Invalid input_shape value: {input_shape}")
    ref = next(model.parameters())
    return torch.zeros((1, *shape), device=ref.device, dtype=ref.dtype)


def coupled_groups(
    model: nn.Module, input_shape: Sequence[int], *, dense_first_layer: bool = False
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` (traced once on a zero input of ``input_shape``,
    no batch dimension, in eval mode; the model's mode and buffers are left as they were).

    Groups that reach the network's output (its last conv/linear layer) are left out, and with
    ``dense_first_layer`` those whose producers include the first conv/linear layer.
    """
    tp = torch_pruning()
    layers = maskable_modules(model)
    if not layers:
        raise ValueError("Invalid model value: no conv/linear layer")
    for name, m in layers:
        if isinstance(m, _CONV_TYPES) and m.groups != 1:
            raise ValueError(f"Invalid model value: grouped conv {name!r} (groups={m.groups})")
    names = {m: n for n, m in model.named_modules()}
    head, first = layers[-1][1], layers[0][1]
    x = _example_input(model, input_shape)
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
        groups = []
        roots = (*_CONV_TYPES, nn.Linear)
        for g in graph.get_all_groups(ignored_layers=[head], root_module_types=roots):
            group = _to_group(g, graph, names)
            if group is None:
                continue
            if dense_first_layer and any(s.module is first for s in group.producers):
                continue
            groups.append(group)
    finally:
        model.train(was_training)
    if not groups:
        raise ValueError("Invalid model value: no prunable channel group")
    return groups


def _to_group(g: Any, graph: Any, names: dict[nn.Module, str]) -> ChannelGroup | None:
    """A torch-pruning group as a :class:`ChannelGroup` (``None`` when it reaches the output)."""
    tp = torch_pruning()
    root_module = g[0].dep.target.module
    group = ChannelGroup(root=names[root_module], size=len(g[0].idxs))
    for item in g:
        node = item.dep.target
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return None
        module = node.module
        if not isinstance(module, nn.Module) or module not in names:
            continue  # torch-pruning's placeholders for additions, flattening, ...
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        piece = GroupSlice(
            name=names[module],
            module=module,
            dim=0 if out else 1,
            index=torch.as_tensor(list(item.idxs), dtype=torch.long),
            root=torch.as_tensor(list(item.root_idxs), dtype=torch.long),
        )
        if isinstance(module, NORM_TYPES):
            group.norms.append(piece)
        elif isinstance(module, (*_CONV_TYPES, nn.Linear)):
            (group.producers if out else group.consumers).append(piece)
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(
                f"Invalid model value: {names[module]!r} ({type(module).__name__}) has "
                "per-channel parameters structured masks do not handle"
            )
    return group


def group_keep_counts(
    groups: Sequence[ChannelGroup], structure: str, density: float, distribution: str
) -> list[int]:
    """Channels kept per group: ``min(n, max(1, round(d * n)))`` with ``d`` the size-weighted
    mean of the group's masked layers' densities from
    :func:`~robust_agc.sparse.distributions.layer_densities` (see the module doc)."""
    _check_structure(structure)
    layers: dict[int, nn.Module] = {}
    for g in groups:
        for s in g.members(structure):
            layers.setdefault(id(s.module), s.module)
    ids = list(layers)
    shapes = [tuple(layers[i].weight.shape) for i in ids]
    dens = dict(zip(ids, layer_densities(shapes, density, distribution)))
    counts = []
    for g in groups:
        mods = {id(s.module): s.module for s in g.members(structure)}
        sizes = {i: m.weight.numel() for i, m in mods.items()}
        d = sum(dens[i] * sizes[i] for i in mods) / sum(sizes.values()) if mods else 1.0
        counts.append(min(g.size, max(1, round(d * g.size))))
    return counts


def _channel_scores(group: ChannelGroup, slices: Sequence[GroupSlice], source: str) -> Tensor:
    """Per-channel sum over ``slices`` of the L1 norm of the weight (``source="weight"``) or of
    the weight's gradient (``"grad"``; absent gradients count zero)."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for s in slices:
        t = s.module.weight if source == "weight" else s.module.weight.grad
        if t is None:
            continue
        t = t.detach().abs().float()
        per_pos = t.transpose(0, s.dim).reshape(t.shape[s.dim], -1).sum(1)
        out.index_add_(0, s.root, per_pos[s.index].double().cpu())
    return out


def filter_l1_norms(group: ChannelGroup) -> Tensor:
    """Per channel of ``group``, the summed L1 norm of its producers' filters (Li et al. 2017's
    ranking; float64 on the CPU)."""
    return _channel_scores(group, group.producers, "weight")


class StructuredMasks(SparseMasks):
    """:class:`~robust_agc.sparse.SparseMasks` whose masks remove whole channels of coupled
    ``groups``, plus (``filter``) the zeroing of removed channels' BatchNorm weight and bias and
    producer biases through its own optimizer step hooks. Build with
    :func:`apply_structured_masks`."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, nn.Module]],
        groups: Sequence[ChannelGroup],
        *,
        structure: str,
        distribution: str | None = None,
        target_density: float | None = None,
    ) -> None:
        _check_structure(structure)
        super().__init__(model, layers, distribution=distribution, target_density=target_density)
        self.structure = structure
        self.groups: list[ChannelGroup] = list(groups)
        self._extra_handles: dict[int, list[RemovableHandle]] = {}
        self._removed_cache: tuple[tuple[Any, ...], list[tuple[nn.Parameter, Tensor]]] | None = None

    # ------------------------------------------------------------------ views
    def kept_channels(self, index: int) -> Tensor:
        """Bool vector of the channels group ``index`` keeps, read from its first masked layer."""
        g = self.groups[index]
        s = g.members(self.structure)[0]
        mask = getattr(s.module, MASK_BUFFER)
        active = mask.transpose(0, s.dim).reshape(mask.shape[s.dim], -1).any(1).cpu()
        kept = torch.zeros(g.size, dtype=torch.bool)
        kept[s.root[active[s.index]]] = True
        return kept

    def channel_counts(self) -> dict[str, int]:
        """Kept channels per group, by the group's root layer name."""
        return {g.root: int(self.kept_channels(i).sum()) for i, g in enumerate(self.groups)}

    def set_kept_channels(self, index: int, kept: Tensor) -> None:
        """Rewrite group ``index``'s masks so that exactly the channels ``kept`` are active."""
        g = self.groups[index]
        kept = kept.to(torch.bool).cpu()
        with torch.no_grad():
            for s in g.members(self.structure):
                mask = getattr(s.module, MASK_BUFFER)
                mask.index_fill_(s.dim, s.positions(kept).to(mask.device), True)
                mask.index_fill_(s.dim, s.positions(~kept).to(mask.device), False)

    # ------------------------------------------------------------------ enforcement
    def removed_parameters(self) -> list[tuple[nn.Parameter, Tensor]]:
        """``(parameter, positions)`` of the BatchNorm weights/biases and producer biases of
        removed channels (``filter``; empty for ``channel``)."""
        if self.structure != "filter":
            return []
        firsts = [getattr(g.members(self.structure)[0].module, MASK_BUFFER) for g in self.groups]
        key = tuple((id(m), m._version, m.device) for m in firsts)
        if self._removed_cache is not None and self._removed_cache[0] == key:
            return self._removed_cache[1]
        out = []
        for i, g in enumerate(self.groups):
            removed = ~self.kept_channels(i)
            if not removed.any():
                continue
            for s in g.norms + g.producers:
                pos = s.positions(removed)
                params = [s.module.bias] if s in g.producers else [s.module.weight, s.module.bias]
                for p in params:
                    if isinstance(p, nn.Parameter):
                        out.append((p, pos.to(p.device)))
        self._removed_cache = (key, out)
        return out

    def _zero_extra(self, optimizer: torch.optim.Optimizer | None, *, values: bool) -> None:
        with torch.no_grad():
            for p, pos in self.removed_parameters():
                if values:
                    p.index_fill_(0, pos, 0)
                elif p.grad is not None:
                    p.grad.index_fill_(0, pos, 0)
                state = None if optimizer is None else optimizer.state.get(p)
                for v in (state or {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.index_fill_(0, pos.to(v.device), 0)

    def reset_norm_stats_(self, channels: Sequence[Tensor] | None = None) -> None:
        """Reset the BatchNorm running mean/variance to 0/1 at the given per-group channels
        (default: the removed ones)."""
        with torch.no_grad():
            for i, g in enumerate(self.groups):
                sel = ~self.kept_channels(i) if channels is None else channels[i]
                for s in g.norms:
                    pos = s.positions(sel)
                    for name, value in (("running_mean", 0.0), ("running_var", 1.0)):
                        buf = getattr(s.module, name, None)
                        if isinstance(buf, Tensor):
                            buf.index_fill_(0, pos.to(buf.device), value)

    def apply_(self) -> None:
        """Zero the pruned weights, and (``filter``) removed channels' BatchNorm and biases."""
        super().apply_()
        self._zero_extra(None, values=True)

    def zero_optimizer_state_(
        self, optimizer: torch.optim.Optimizer, where: Sequence[Tensor] | None = None
    ) -> None:
        """As :meth:`SparseMasks.zero_optimizer_state_`, plus the removed channels' 1-D state."""
        super().zero_optimizer_state_(optimizer, where)
        self._zero_extra(optimizer, values=False)

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """The masks' hooks, then this object's (same order: pre-hook zeroes gradients and
        state, post-hook values and state of removed channels' 1-D parameters)."""
        handles = super().attach(optimizer)
        key = id(optimizer)
        if key not in self._extra_handles:

            def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                self._zero_extra(opt, values=False)

            def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                self._zero_extra(opt, values=True)

            self._extra_handles[key] = [
                optimizer.register_step_pre_hook(pre),
                optimizer.register_step_post_hook(post),
            ]
        return handles + self._extra_handles[key]

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove every hook :meth:`attach` put on ``optimizer``."""
        super().detach(optimizer)
        for h in self._extra_handles.pop(id(optimizer), []):
            h.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(structure={self.structure!r}, groups={len(self.groups)}, "
            f"layers={len(self)}, density={self.density:.4f}, distribution={self.distribution!r})"
        )


def _check_args(model: nn.Module, sparsity: float, distribution: str, criterion: str) -> None:
    check_mask_args(model, sparsity, distribution)
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid criterion value: {criterion!r} (choose from random, l1)")


def apply_structured_masks(
    model: nn.Module,
    *,
    sparsity: float,
    structure: str = "filter",
    input_shape: Sequence[int],
    distribution: str = "uniform",
    criterion: str = "random",
    dense_first_layer: bool = False,
    rescale_init: bool = True,
    generator: torch.Generator | int | None = None,
    channel_scores: Sequence[Tensor] | None = None,
) -> StructuredMasks:
    """Register filter or channel masks with exact per-group counts on ``model``.

    Args:
        model: the network (every conv/linear layer of a prunable group is masked).
        sparsity: fraction of channels removed, in ``[0, 1)`` (see the module doc for counts).
        structure: ``"filter"`` (output channels of the producers) or ``"channel"`` (input
            channels of the consumers).
        input_shape: one input's shape without the batch dimension, for the dependency trace.
        distribution: ``"uniform"``, ``"er"`` or ``"erk"`` (per-layer densities, averaged per
            group).
        criterion: ``"random"`` (top-``k`` of uniform scores from ``generator``) or ``"l1"``
            (the channels whose masked layers' weights have the largest summed L1 norm; Li et al.
            2017, "Pruning Filters for Efficient ConvNets", https://arxiv.org/abs/1608.08710).
        dense_first_layer: leave the groups produced by the first conv/linear layer whole.
        rescale_init: multiply each consumer's weights by ``1 / sqrt(kept fraction)`` of its input
            group (its effective fan-in), as :func:`~robust_agc.sparse.apply_masks` does.
        generator: CPU generator or int seed (``random``); ``None`` draws a seed from torch's RNG.
        channel_scores: one score per channel of every group, in :func:`coupled_groups`' order
            (HYDRA's filter scores, :mod:`robust_agc.prune.filter_scores`): the top-``k`` of each
            group are kept, whatever ``criterion`` says.

    Returns:
        The :class:`StructuredMasks` of the registered ``weight_mask`` buffers, already applied.
    """
    _check_structure(structure)
    _check_args(model, sparsity, distribution, criterion)
    gen = check_generator(generator)
    for name, m in maskable_modules(model):
        if hasattr(m, MASK_BUFFER):
            raise ValueError(f"Invalid model value: {name!r} already has a {MASK_BUFFER!r} buffer")
    groups = coupled_groups(model, input_shape, dense_first_layer=dense_first_layer)
    counts = group_keep_counts(groups, structure, 1.0 - float(sparsity), distribution)
    kept = _kept_channels(groups, counts, structure, criterion, gen, channel_scores)
    layers: dict[int, tuple[str, nn.Module]] = {}
    for g in groups:
        for s in g.members(structure):
            layers.setdefault(id(s.module), (s.name, s.module))
    with torch.no_grad():
        for _, m in layers.values():
            m.register_buffer(MASK_BUFFER, torch.ones_like(m.weight, dtype=torch.bool))
    order = {n: i for i, (n, _) in enumerate(maskable_modules(model))}
    ordered = sorted(layers.values(), key=lambda nm: order[nm[0]])
    masks = StructuredMasks(
        model,
        ordered,
        groups,
        structure=structure,
        distribution=distribution,
        target_density=1.0 - float(sparsity),
    )
    for i, k in enumerate(kept):
        masks.set_kept_channels(i, k)
    masks.sync_from_buffers()  # ever-active record, weights and removed channels zeroed
    masks.reset_norm_stats_()
    if rescale_init:
        _rescale_consumers(groups, counts)
    logger.info(
        "applied %s masks to %d groups (%d layers): channels %s",
        structure,
        len(groups),
        len(masks),
        masks.channel_counts(),
    )
    return masks


def _kept_channels(
    groups: Sequence[ChannelGroup],
    counts: Sequence[int],
    structure: str,
    criterion: str,
    gen: torch.Generator,
    channel_scores: Sequence[Tensor] | None,
) -> list[Tensor]:
    """The bool kept channels of each group: the top-``counts[i]`` of ``channel_scores[i]``,
    else of the L1 norms (``l1``) or of uniform draws from ``gen`` (``random``)."""
    if channel_scores is not None and [tuple(t.shape) for t in channel_scores] != [
        (g.size,) for g in groups
    ]:
        raise ValueError(
            f"Invalid channel_scores value: shapes {[tuple(t.shape) for t in channel_scores]} "
            f"for groups of {[g.size for g in groups]} channels"
        )
    out = []
    for i, (g, k) in enumerate(zip(groups, counts)):
        if channel_scores is not None:
            scores = channel_scores[i].detach().double().cpu()
        elif criterion == "l1":
            scores = _channel_scores(g, g.members(structure), "weight")
        else:
            scores = torch.rand(g.size, generator=gen, dtype=torch.float64)
        kept = torch.zeros(g.size, dtype=torch.bool)
        kept[torch.topk(scores, k, sorted=False).indices] = True
        out.append(kept)
    return out


def _rescale_consumers(groups: Sequence[ChannelGroup], counts: Sequence[int]) -> None:
    with torch.no_grad():
        for g, k in zip(groups, counts):
            if 0 < k < g.size:
                for s in g.consumers:
                    s.module.weight.mul_(1.0 / math.sqrt(k / g.size))


def l1_filter_masks(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: Sequence[int],
    distribution: str = "uniform",
    dense_first_layer: bool = False,
) -> StructuredMasks:
    """Filter masks keeping, per coupled group, the filters of largest L1 norm (Li et al. 2017,
    "Pruning Filters for Efficient ConvNets", https://arxiv.org/abs/1608.08710: rank a layer's
    filters by the sum of their absolute weights; coupled layers of a residual sum are ranked by
    the sum of their filters' norms, so the export can remove the channel everywhere).

    For pruning a trained (robust) source: no rescaling, no random draws. The surviving weights,
    BatchNorm parameters and biases are untouched; removed ones are zeroed.
    """
    return apply_structured_masks(
        model,
        sparsity=sparsity,
        structure="filter",
        input_shape=input_shape,
        distribution=distribution,
        criterion="l1",
        dense_first_layer=dense_first_layer,
        rescale_init=False,
        generator=0,
    )
