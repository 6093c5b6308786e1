"""Mixed precision for training: the autocast dtype, the float16 loss scaler and its skip rule.

``--amp bf16|fp16`` runs the attack, the training forward and loss, and a corrected optimizer's
snapshot and refresh passes under ``torch.autocast`` (parameters, optimizer state and evaluation
stay float32). float16 adds a ``GradScaler``; :func:`scaled_step` takes the optimizer step only
when every gradient it will use is finite (see ``docs/agc.md`` for the snapshot gradient).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..utils import all_finite

__all__ = ["AMP_DTYPES", "autocast", "build_scaler", "loss_scale_kwargs", "scaled_step"]

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each ``--amp`` value (``off`` is absent)."""


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` in ``dtype`` (a no-op context when ``dtype`` is ``None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def build_scaler(
    amp: str, device_type: str
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype, loss scaler)`` for ``--amp amp`` on ``device_type``.

    The scaler exists for float16 only. Raises :class:`UserError` when this torch build cannot
    autocast to the dtype on the device (older builds silently disable an unsupported dtype).
    """
    dtype = AMP_DTYPES.get(amp)
    if dtype is None:
        return None, None
    ok = torch.amp.is_autocast_available(device_type)
    if ok:
        with autocast(device_type, dtype):
            ok = torch.is_autocast_enabled(device_type)
    if not ok:
        raise UserError(
            f"Invalid amp value: {amp!r} (this torch build has no {amp} autocast "
            f"on {device_type}; use --amp off)"
        )
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
    return dtype, scaler


def loss_scale_kwargs(
    scaler: torch.amp.GradScaler | None, device: torch.device
) -> dict[str, Tensor]:
    """``{"loss_scale": scale}`` for a corrected optimizer's passes under float16 (the scaler's
    current scale as a device tensor, read without synchronising), else ``{}``."""
    if scaler is None:
        return {}
    return {"loss_scale": scaler.scale(torch.ones((), device=device))}


def scaled_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, *, corrected: bool
) -> bool:
    """The optimizer step under an optional float16 loss scaler; returns whether it was taken.

    Without a scaler it always is. With one the gradients are unscaled, and the step is taken only
    if every ``p.grad`` and (corrected optimizers) every snapshot gradient is finite: otherwise it
    is skipped and the scale backs off, as ``GradScaler.step`` does (the same single
    synchronisation per step); the snapshot gradient is checked too, which ``GradScaler`` cannot
    see, and when only it overflowed the scale is backed off here. ``corrected``: whether
    ``optimizer`` is a :class:`~robust_agc.optim.CorrectedOptimizer` (decided once by the caller,
    not per step).
    """
    if scaler is None:
        optimizer.step()
        return True
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    snap_grads = optimizer.snapshot_gradients() if corrected else []  # type: ignore[attr-defined]
    if all_finite(grads + snap_grads):
        optimizer.step()
        scaler.update()
        return True
    if all_finite(grads):  # only the snapshot gradient overflowed: GradScaler did not see it
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
    else:  # GradScaler's own backoff (and growth-tracker reset)
        scaler.update()
    return False
