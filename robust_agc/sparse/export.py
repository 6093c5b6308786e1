"""Export of masked models: plain dense modules and sparse-tensor state dicts.

- :func:`fold_masks`: a deep copy with the masks multiplied in (``where``) and the mask buffers
  removed, so its ``state_dict`` keys equal those of an unmasked model of the same architecture
  (what evaluators such as AutoAttack/RobustBench expect).
- :func:`to_sparse_state_dict`: the folded state dict with every masked weight stored as a torch
  sparse tensor (``coo`` keeps the weight's shape; ``csr`` stores the 2-D view
  ``(out, in * kernel)``); :func:`densify_state_dict` turns it back into a loadable dense one and
  :func:`state_dict_nbytes` measures a state dict's serialized size.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .masks import EVER_BUFFER, MASK_BUFFER

__all__ = ["fold_masks", "to_sparse_state_dict", "densify_state_dict", "state_dict_nbytes"]

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
