"""Export of masked models: plain dense modules and sparse-tensor state dicts.

- :func:`fold_masks`: a deep copy with the masks multiplied in (``where``) and the mask buffers
  removed, so its ``state_dict`` keys equal those of an unmasked model of the same architecture
  (what evaluators such as AutoAttack/RobustBench expect).
- :func:`to_sparse_state_dict`: the folded state dict with every masked weight stored as a torch
  sparse tensor (``coo`` keeps the weight's shape; ``csr`` stores the 2-D view
  ``(out, in * kernel)``); :func:`densify_state_dict` turns it back into a loadable dense one and
  :func:`state_dict_nbytes` measures a state dict's serialized size.
- :func:`export_structured`: a filter/channel-sparse model as a genuinely smaller plain module
  (removed channels deleted), with the per-layer widths the registry rebuilds it from.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .masks import EVER_BUFFER, MASK_BUFFER, maskable_modules
from .structured import ChannelGroup, GroupSlice, coupled_groups, torch_pruning

__all__ = [
    "densify_state_dict",
    "export_structured",
    "fold_masks",
    "layer_widths",
    "removable_channels",
    "state_dict_nbytes",
    "to_sparse_state_dict",
]

_LAYOUTS = ("csr", "coo")


def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, MASK_BUFFER, None), Tensor)
    ]


@torch.no_grad()
def fold_masks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with masks folded into the weights and no mask buffers.

    Pruned weights are set to exactly zero with ``where`` semantics (NaN at pruned positions
    becomes 0). The input model is not modified. A model without masks is simply copied.
    """
    out = copy.deepcopy(model)
    for _, m in _masked_modules(out):
        mask = m._buffers.pop(MASK_BUFFER)
        m._buffers.pop(EVER_BUFFER, None)
        m._non_persistent_buffers_set.discard(EVER_BUFFER)
        m.weight.masked_fill_(torch.logical_not(mask.to(m.weight.device)), 0)
    return out


@torch.no_grad()
def to_sparse_state_dict(model: nn.Module, layout: str = "csr") -> OrderedDict[str, Tensor]:
    """The folded state dict with masked weights as torch sparse tensors.

    Args:
        model: a masked model (unmasked weights and all other entries stay dense).
        layout: ``"csr"`` (2-D view ``(out, -1)``, int32 indices: ~8 bytes per active weight
            in float32) or ``"coo"`` (full shape, int64 indices: ``4 + 8 * ndim`` bytes).

    Returns:
        An ``OrderedDict`` with the keys of an unmasked model; restore with
        :func:`densify_state_dict`.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"Invalid layout value: {layout!r} (choose from {', '.join(_LAYOUTS)})")
    masked = {f"{n}.weight" if n else "weight": m for n, m in _masked_modules(model)}
    drop = {
        f"{n}.{b}" if n else b
        for n, _ in _masked_modules(model)
        for b in (MASK_BUFFER, EVER_BUFFER)
    }
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        if key in drop:
            continue
        if key in masked:
            mask = getattr(masked[key], MASK_BUFFER).to(value.device)
            w = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
            if layout == "coo":
                out[key] = w.to_sparse().coalesce()
            else:
                out[key] = _compact_csr(w.reshape(w.shape[0], -1))
        else:
            out[key] = value.detach().clone()
    return out


def _compact_csr(w2d: Tensor) -> Tensor:
    """CSR with int32 indices in their own storages (``to_sparse_csr`` shares one for both)."""
    with warnings.catch_warnings():
        # torch flags CSR as "beta" on first use; the layout is what was asked for.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        csr = w2d.to_sparse_csr()
        idx = torch.int32 if max(w2d.shape) < 2**31 and csr._nnz() < 2**31 else torch.int64
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(idx).clone(),
            csr.col_indices().to(idx).clone(),
            csr.values().clone(),
            size=w2d.shape,
            check_invariants=True,
        )


def densify_state_dict(
    state_dict: Mapping[str, Tensor], reference: nn.Module
) -> OrderedDict[str, Tensor]:
    """Dense tensors shaped like ``reference``'s entries from :func:`to_sparse_state_dict` output."""
    ref = reference.state_dict()
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if value.layout != torch.strided:
            dense = value.to_dense()
            if key in ref:
                dense = dense.reshape(ref[key].shape)
            out[key] = dense
        else:
            out[key] = value
    return out


def state_dict_nbytes(state_dict: Mapping[str, Tensor]) -> int:
    """Size in bytes of ``torch.save(state_dict)`` (serialized to memory)."""
    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)
    return buf.getbuffer().nbytes


def _zero_channels(group: ChannelGroup, slices: list[GroupSlice], biases_too: bool) -> Tensor:
    """Channels of ``group`` where every slice's weight (and bias, norms: weight and bias) is 0."""
    nonzero = torch.zeros(group.size, dtype=torch.bool)
    for s in slices:
        w = s.module.weight.detach()
        per_pos = w.ne(0).transpose(0, s.dim).reshape(w.shape[s.dim], -1).any(1).cpu()
        nonzero[s.root[per_pos[s.index]]] = True
        if biases_too and s.dim == 0 and isinstance(s.module.bias, Tensor):
            b = s.module.bias.detach().ne(0).cpu()
            nonzero[s.root[b[s.index]]] = True
    return ~nonzero


def removable_channels(group: ChannelGroup) -> Tensor:
    """Bool vector of ``group``'s channels that can be deleted without changing the function:
    every consumer's input slice is zero (channel sparsity), or every producer's filter and bias
    and every normalisation layer's weight and bias are zero (filter sparsity; the channel then
    carries zeros through the zero-preserving activations and pooling of the registry's models).
    """
    dead_inputs = _zero_channels(group, group.consumers, False) if group.consumers else None
    dead_outputs = _zero_channels(group, group.producers + group.norms, True)
    return dead_outputs if dead_inputs is None else dead_outputs | dead_inputs


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer by qualified name (what
    :func:`~robust_agc.models.create_model`'s ``widths`` takes)."""
    out = {}
    for name, m in maskable_modules(model):
        out[name] = int(m.out_channels if hasattr(m, "out_channels") else m.out_features)
    return out


@torch.no_grad()
def export_structured(
    model: nn.Module, input_shape: Sequence[int]
) -> tuple[nn.Module, dict[str, int]]:
    """A physically smaller copy of a filter/channel-sparse ``model`` with the same outputs.

    The masks are folded (:func:`fold_masks`); then, per coupled channel group
    (:func:`~robust_agc.sparse.structured.coupled_groups`, torch-pruning's ``DependencyGraph``),
    the channels found by :func:`removable_channels` are deleted from every member (conv/linear
    filters and input slices, BatchNorm entries and running statistics, biases) with
    torch-pruning's ``Group.prune`` (https://github.com/VainF/Torch-Pruning,
    ``torch_pruning/dependency/group.py``). At least one channel of a group is always kept.

    Args:
        model: a masked (``weight_mask`` buffers) or folded model; not modified.
        input_shape: one input's shape without the batch dimension (for the dependency trace).

    Returns:
        ``(small_model, widths)``: a plain module without mask buffers, in ``model``'s mode,
        and :func:`layer_widths` of it, from which the registry rebuilds the architecture
        (``create_model(name, widths=widths)``).
    """
    small = fold_masks(model)
    groups = coupled_groups(small, input_shape)
    removed = []
    for g in groups:
        dead = removable_channels(g)
        if bool(dead.all()):
            dead[0] = False  # a layer needs one channel; the kept one carries zeros
        removed.append(dead.nonzero().flatten().tolist())
    tp = torch_pruning()
    x = torch.zeros((1, *input_shape), device=next(small.parameters()).device)
    was_training = small.training
    small.eval()
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(small, example_inputs=x, verbose=False)
    for g, idxs in zip(groups, removed):
        if not idxs:
            continue
        root = g.producers[0].module
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, idxs).prune()
    small.train(was_training)
    small.zero_grad(set_to_none=True)
    return small, layer_widths(small)
