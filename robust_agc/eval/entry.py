"""The public entry point: :func:`benchmark` checks its arguments once into a plan, resolves the
points, prepares the model and hands over to :func:`robust_agc.eval.runner.run_evaluation`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..utils import eval_mode, frozen_parameters
from .loading import compression_info
from .plan import EvalPlan, ThreatModel, make_plan
from .result import EvalResult
from .runner import RecordInfo, run_evaluation

__all__ = ["benchmark", "resolve_points"]


def benchmark(
    model: nn.Module,
    *,
    dataset: str | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    threat_model: ThreatModel | str = "Linf",
    eps: float,
    n_examples: int | None = None,
    attacks: str | Sequence[str] = ("clean", "autoattack"),
    version: str | Sequence[str] = "standard",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pgd_steps: int = 50,
    pgd_restarts: int = 10,
    pgd_step_size: float | None = None,
    fmn_steps: int = 1000,
    eps_grid: Sequence[float] | None = None,
    fmn_slice: tuple[int, int] | None = None,
    state_file: str | Path | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
    run_checks: bool = True,
    model_info: dict[str, Any] | None = None,
    architecture: str | None = None,
    notes: Sequence[str] = (),
    compression: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``model`` under a threat model, per-point worst case over the given stages.

    Args:
        model: a classifier of inputs in [0, 1] to logits ``(N, C)``; eval mode while evaluated.
        dataset, data_dir: a dataset name (:func:`robust_agc.data.load_dataset`, test split, found
            in ``data_dir``); the first ``n_examples`` points, unshuffled. Exclusive with ``x``/``y``.
        x, y: explicit points (floats in [0, 1], NCHW) and labels.
        threat_model, eps, n_examples, attacks, version, batch_size, seed, pgd_steps, pgd_restarts,
            pgd_step_size, run_checks, fmn_steps, eps_grid, fmn_slice: the attack settings, checked by
            :func:`~robust_agc.eval.plan.make_plan` (``eps`` required; default ``clean`` then
            AutoAttack ``"standard"``, 256-point chunks, seed 0; ``fmn``: radii and curve).
        device: where to run; the model is moved there and back if needed.
        state_file: JSON of the per-point flags, saved after every chunk (round when distributed;
            rank 0); a rerun resumes from it, and refuses (UserError) another evaluation's.
        progress: tqdm bars (stderr) with the points remaining per stage (rank 0 only).
        model_info, architecture, notes: caller metadata, model name and remarks, recorded.
        compression: the record's ``sparsity``, ``structure`` and ``footnote``; default
            :func:`compression_info` of ``model`` (a shrunk model's: its loader's ``info``).

    Returns:
        An :class:`EvalResult`; distributed, every rank (same arguments) returns rank 0's.

    Raises:
        ValueError: invalid arguments (torch wording: ``Invalid <name> value: ...``).
        UserError: a state file from another evaluation, unavailable data, or an ``fmn_slice``
            beyond the points there are.
        RuntimeError: distributed ranks called with different points, model or attacks.
    """
    plan = make_plan(
        eps=eps, threat_model=threat_model, n_examples=n_examples, attacks=attacks,
        version=version, batch_size=batch_size, seed=seed, pgd_steps=pgd_steps,
        pgd_restarts=pgd_restarts, pgd_step_size=pgd_step_size, run_checks=run_checks,
        fmn_steps=fmn_steps, eps_grid=eps_grid, fmn_slice=fmn_slice,
        stacklevel=2,  # the warning points at benchmark's caller
    )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model value: expected an nn.Module, got {type(model).__name__}")
    x, y, dataset = resolve_points(dataset, x, y, n_examples, data_dir)
    if plan.fmn_slice is not None and plan.fmn_slice[1] > x.shape[0]:
        raise UserError(  # a ValueError; the CLI prints it on one line
            f"Invalid fmn_slice value: {plan.fmn_slice[0]}:{plan.fmn_slice[1]} (only "
            f"{x.shape[0]} points)"
        )
    info = RecordInfo(
        dataset, architecture, dict(model_info or {}), tuple(notes),
        Path(state_file) if state_file is not None else None, progress,
        compression=compression_info(model) if compression is None else dict(compression),
    )  # fmt: skip
    return _on_device(model, plan, x, y, torch.device(device), info)


def _on_device(
    model: nn.Module, plan: EvalPlan, x: Tensor, y: Tensor, device: torch.device, info: RecordInfo
) -> EvalResult:
    """:func:`~robust_agc.eval.runner.run_evaluation` with the model on ``device`` (moved back
    afterwards), in eval mode, its parameters frozen and the global RNG state forked."""
    params = list(model.parameters()) + list(model.buffers())
    orig_device = params[0].device if params else device
    if orig_device != device:
        model.to(device)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with eval_mode(model), frozen_parameters(model), torch.random.fork_rng(devices=rng_devices):
            return run_evaluation(model, plan, x.to(device), y.to(device), device, info)
    finally:
        if orig_device != device:
            model.to(orig_device)


def resolve_points(
    dataset: str | None,
    x: Tensor | None,
    y: Tensor | None,
    n_examples: int | None,
    data_dir: str | Path | None,
) -> tuple[Tensor, Tensor, str | None]:
    """The points to evaluate: ``dataset``'s test split or ``x``, ``y``, cut to ``n_examples``.

    Returns ``(x, y, dataset)`` with ``y`` as int64.

    Raises:
        ValueError: both or neither of ``dataset`` and ``x``/``y``, mismatched shapes or dtypes,
            too few points, or inputs outside [0, 1].
    """
    if dataset is not None and (x is not None or y is not None):
        raise ValueError("Invalid dataset value: give either dataset or x and y, not both")
    if dataset is None:
        if x is None or y is None:
            raise ValueError("Invalid x value: give a dataset name or both x and y")
    else:
        from ..data import load_dataset

        x, y = load_dataset(dataset, "test", data_dir=data_dir)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("Invalid x value: x and y must be tensors")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Invalid y value: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same length"
        )
    if not x.is_floating_point():
        raise ValueError(f"Invalid x value: expected floats in [0, 1], got dtype {x.dtype}")
    if y.is_floating_point():
        raise ValueError(f"Invalid y value: expected integer labels, got dtype {y.dtype}")
    if n_examples is not None:
        if n_examples > x.shape[0]:
            raise UserError(f"Invalid n_examples value: {n_examples} (only {x.shape[0]} points)")
        x, y = x[:n_examples], y[:n_examples]
    if x.shape[0] == 0:
        raise ValueError("Invalid x value: no points")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"Invalid x value: inputs must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); models "
            "normalize inside"
        )
    return x, y.long(), dataset
