"""Gradient-masking sanity checks for robustness evaluations (after AutoAttack's ``checks.py``).

Each check returns a :class:`CheckResult` (a flag plus machine-readable details) and never raises on
a suspicious model: a fired flag is *information* for the reader of an evaluation record, and is
also announced with :func:`warnings.warn` (category :class:`GradientMaskingWarning`) by
:meth:`MaskingReport.warn`. The flags, by name:

``nondeterministic_logits``
    two forward passes on the same inputs (model in eval mode) give different logits: a randomized
    defense or a model left in train mode; gradient attacks then need EoT (``version="rand"``).
``probability_output``
    every output row is non-negative and sums to 1: the model returns probabilities, not logits, so
    cross-entropy gradients vanish where the softmax saturates.
``zero_gradients``
    the input gradient of the loss is exactly zero on a noticeable fraction of points
    (non-differentiable layers, quantisation, saturated outputs).
``too_few_classes``
    the targeted attacks want more target classes than the model has (``n_classes - 1``); the
    evaluation adapts ``n_target_classes`` and says so.
``square_beats_gradient``
    the black-box Square attack broke points that every gradient attack before it missed.
``pgd_steps_nonmonotone``
    robust accuracy *rose* when PGD was given more steps: the attack is not converging.
``count_disagreement``
    robust accuracy counted from the per-point flags differs from a re-prediction on the returned
    adversarial images (randomness, a train-mode model, or a bug).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FLAG_NAMES",
    "GradientMaskingWarning",
    "CheckResult",
    "MaskingReport",
    "check_deterministic",
    "check_probability_output",
    "check_zero_gradients",
    "check_n_classes",
    "check_square_beats_gradient",
    "check_pgd_steps",
    "check_count_agreement",
    "run_model_checks",
]

logger = logging.getLogger(__name__)

FLAG_NAMES: tuple[str, ...] = (
    "nondeterministic_logits",
    "probability_output",
    "zero_gradients",
    "too_few_classes",
    "square_beats_gradient",
    "pgd_steps_nonmonotone",
    "count_disagreement",
)


class GradientMaskingWarning(UserWarning):
    """A robustness evaluation looks unreliable (possible gradient masking or randomness)."""


@dataclass
class CheckResult:
    """One check: its flag name, whether it fired, a one-line message and JSON-friendly details."""

    name: str
    fired: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskingReport:
    """The flags of all checks that ran (``dict[str, bool]``) and their details."""

    results: dict[str, CheckResult] = field(default_factory=dict)

    def add(self, result: CheckResult) -> CheckResult:
        """Record ``result`` (a later result of the same name replaces an earlier one)."""
        self.results[result.name] = result
        return result

    @property
    def flags(self) -> dict[str, bool]:
        """``{flag name: fired}`` for every check that ran."""
        return {k: r.fired for k, r in self.results.items()}

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        """``{flag name: details}`` for every check that ran (messages included)."""
        return {k: {"message": r.message, **r.details} for k, r in self.results.items()}

    @property
    def fired(self) -> list[str]:
        """Names of the flags that fired."""
        return [k for k, r in self.results.items() if r.fired]

    def warn(self, stacklevel: int = 2) -> None:
        """``warnings.warn`` once per fired flag (category :class:`GradientMaskingWarning`)."""
        for r in self.results.values():
            if r.fired:
                warnings.warn(
                    f"[{r.name}] {r.message}", GradientMaskingWarning, stacklevel=stacklevel + 1
                )


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def check_deterministic(
    model: nn.Module, x: Tensor, *, rtol: float = 1e-4, n_passes: int = 2
) -> CheckResult:
    """Fire when ``n_passes`` forward passes on ``x`` do not give the same logits.

    Logits are compared after dividing each row by its L2 norm (as AutoAttack does); the check fires
    when the largest row difference exceeds ``rtol`` or a predicted class changes.
    """
    if n_passes < 2:
        raise ValueError(f"Invalid n_passes value: {n_passes}")
    outs = [_logits(model, x) for _ in range(n_passes)]
    normed = [o / (o.flatten(1).norm(dim=1, keepdim=True) + 1e-12) for o in outs]
    max_diff = max((normed[0] - o).flatten(1).norm(dim=1).max().item() for o in normed[1:])
    pred_changes = max(int((outs[0].argmax(1) != o.argmax(1)).sum()) for o in outs[1:])
    fired = bool(max_diff > rtol or pred_changes > 0)
    msg = (
        f"{n_passes} forward passes on the same {x.shape[0]} inputs differ (max normalized "
        f"difference {max_diff:.3g}, {pred_changes} predictions changed): randomized defense or "
        "train-mode model; use version='rand' (EoT)"
        if fired
        else "logits are deterministic"
    )
    return CheckResult(
        "nondeterministic_logits",
        fired,
        msg,
        {"max_normalized_diff": max_diff, "prediction_changes": pred_changes, "n": x.shape[0]},
    )


def check_probability_output(logits: Tensor, *, atol: float = 1e-4) -> CheckResult:
    """Fire when every row of ``logits`` is non-negative and sums to 1 (within ``atol``)."""
    if logits.ndim != 2:
        raise ValueError(f"Invalid logits value: expected shape (N, C), got {tuple(logits.shape)}")
    sums = logits.sum(1)
    fired = bool((logits.min() >= -atol) and ((sums - 1).abs() <= atol).all())
    msg = (
        "model outputs look like probabilities (rows non-negative, summing to 1): attacks need "
        "logits, or their gradients vanish where the softmax saturates"
        if fired
        else "outputs are not probability vectors"
    )
    return CheckResult(
        "probability_output",
        fired,
        msg,
        {
            "min_output": float(logits.min()),
            "max_abs_row_sum_minus_1": float((sums - 1).abs().max()),
        },
    )


def check_zero_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, max_fraction: float = 0.05
) -> CheckResult:
    """Fire when the cross-entropy input gradient is exactly zero on more than ``max_fraction`` of points.

    Gradients are taken with respect to the input only (``torch.autograd.grad``); parameters keep
    their ``.grad``.
    """
    if not 0.0 <= max_fraction < 1.0:
        raise ValueError(f"Invalid max_fraction value: {max_fraction}")
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        loss = F.cross_entropy(out, y, reduction="sum")
        if not loss.requires_grad:
            grad = torch.zeros_like(xg)
        else:
            (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(xg)
    norms = grad.detach().flatten(1).abs().sum(1)
    n_zero = int((norms == 0).sum())
    frac = n_zero / max(1, x.shape[0])
    fired = frac > max_fraction
    msg = (
        f"the input gradient is exactly zero on {n_zero} of {x.shape[0]} points ({frac:.1%}): "
        "gradient attacks cannot make progress there (masked or shattered gradients)"
        if fired
        else f"input gradients are non-zero ({n_zero} zero of {x.shape[0]})"
    )
    return CheckResult(
        "zero_gradients", fired, msg, {"n_zero": n_zero, "n": x.shape[0], "fraction": frac}
    )


def check_n_classes(n_classes: int, n_target_classes: int = 9) -> tuple[CheckResult, int]:
    """Fire when targeted attacks want more targets than ``n_classes - 1``; return the adapted count.

    Returns:
        ``(result, n_targets)`` where ``n_targets = min(n_target_classes, n_classes - 1)``.
    """
    if n_classes < 2:
        raise ValueError(f"Invalid n_classes value: {n_classes}")
    if n_target_classes < 1:
        raise ValueError(f"Invalid n_target_classes value: {n_target_classes}")
    adapted = min(n_target_classes, n_classes - 1)
    fired = adapted < n_target_classes
    msg = (
        f"only {n_classes} classes: targeted attacks run with {adapted} target classes instead "
        f"of {n_target_classes}"
        if fired
        else f"{n_classes} classes allow {n_target_classes} target classes"
    )
    if n_classes <= 3:
        msg += "; the (targeted) DLR loss needs at least 3 (4) classes"
    return CheckResult(
        "too_few_classes",
        fired,
        msg,
        {"n_classes": n_classes, "requested": n_target_classes, "used": adapted},
    ), adapted


def check_square_beats_gradient(
    broken_by: Sequence[str | None],
    *,
    square_stages: Sequence[str] = ("square", "autoattack/square"),
    max_fraction: float = 0.002,
) -> CheckResult:
    """Fire when a Square stage broke more than ``max_fraction`` of all points.

    ``broken_by[i]`` names the stage that broke point ``i`` (``"clean"`` for misclassified points,
    ``None`` when robust). A Square stage only sees points every earlier (gradient) stage missed, so
    any point it breaks is one the gradient attacks failed on; AutoAttack's tolerance is 0.2%.
    """
    n = len(broken_by)
    n_square = sum(1 for b in broken_by if b in square_stages)
    frac = n_square / max(1, n)
    fired = frac > max_fraction
    msg = (
        f"the black-box Square attack broke {n_square} of {n} points ({frac:.1%}) that the "
        "gradient attacks missed: gradients are probably masked"
        if fired
        else f"Square broke {n_square} points the gradient attacks missed"
    )
    return CheckResult(
        "square_beats_gradient", fired, msg, {"n_broken_by_square": n_square, "fraction": frac}
    )


def check_pgd_steps(
    robust_few: Tensor, robust_many: Tensor, *, steps: tuple[int, int], tolerance: int = 0
) -> CheckResult:
    """Fire when PGD with more steps leaves *more* points robust than PGD with fewer steps.

    Args:
        robust_few: per-point robust flags after PGD with ``steps[0]`` steps.
        robust_many: the same points after PGD with ``steps[1]`` (more) steps.
        steps: the two step counts (for the record).
        tolerance: points of slack allowed (random restarts can differ by a point or two).
    """
    if robust_few.shape != robust_many.shape:
        raise ValueError(
            f"Invalid robust_many value: shape {tuple(robust_many.shape)} != {tuple(robust_few.shape)}"
        )
    n_few, n_many = int(robust_few.sum()), int(robust_many.sum())
    n = robust_few.numel()
    fired = n_many > n_few + tolerance
    msg = (
        f"robust accuracy rose with more PGD steps ({steps[0]} steps: {n_few}/{n}, "
        f"{steps[1]} steps: {n_many}/{n}): the attack does not converge"
        if fired
        else f"robust accuracy does not rise with more PGD steps ({n_few} -> {n_many} of {n})"
    )
    return CheckResult(
        "pgd_steps_nonmonotone",
        fired,
        msg,
        {
            "steps": list(steps),
            "robust_few_steps": n_few,
            "robust_many_steps": n_many,
            "n": n,
            "points_broken_only_by_fewer_steps": int((~robust_few & robust_many).sum()),
        },
    )


def check_count_agreement(flags: Tensor, repredicted: Tensor) -> CheckResult:
    """Fire when robust flags and a re-prediction on the adversarial images disagree on any point."""
    if flags.shape != repredicted.shape:
        raise ValueError(
            f"Invalid repredicted value: shape {tuple(repredicted.shape)} != {tuple(flags.shape)}"
        )
    n_dis = int((flags.bool() != repredicted.bool()).sum())
    fired = n_dis > 0
    msg = (
        f"robust accuracy counted twice disagrees on {n_dis} points (flags {int(flags.sum())}, "
        f"re-predicted {int(repredicted.sum())}): randomness or a train-mode model"
        if fired
        else "flags and re-prediction agree"
    )
    return CheckResult(
        "count_disagreement",
        fired,
        msg,
        {
            "n_disagree": n_dis,
            "robust_from_flags": int(flags.sum()),
            "robust_repredicted": int(repredicted.sum()),
        },
    )


def run_model_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    logits: Tensor | None = None,
    n_target_classes: int | None = 9,
    max_points: int = 256,
    report: MaskingReport | None = None,
) -> tuple[MaskingReport, int | None]:
    """Run the model-only checks (determinism, probability output, zero gradients, class count).

    Args:
        model: the model, already in eval mode and on ``x``'s device.
        x, y: points to check (at most ``max_points`` of them are used).
        logits: the model's outputs on ``x`` if already computed (saves a forward pass).
        n_target_classes: targets the targeted attacks want; ``None`` skips that check.
        max_points: cap on the points used.
        report: a report to add to (a new one otherwise).

    Returns:
        ``(report, n_targets)``: ``n_targets`` is the adapted number of target classes (or ``None``).
    """
    report = report if report is not None else MaskingReport()
    if x.shape[0] == 0:
        return report, n_target_classes
    xs, ys = x[:max_points], y[:max_points]
    out = logits[:max_points] if logits is not None else _logits(model, xs)
    report.add(check_deterministic(model, xs[: min(64, xs.shape[0])]))
    report.add(check_probability_output(out))
    report.add(check_zero_gradients(model, xs, ys))
    n_targets = None
    if n_target_classes is not None:
        res, n_targets = check_n_classes(int(out.shape[1]), n_target_classes)
        report.add(res)
    for r in report.results.values():
        (logger.warning if r.fired else logger.debug)("check %s: %s", r.name, r.message)
    if not math.isfinite(float(out.float().abs().max())):
        logger.warning("model outputs contain inf/nan")
    return report, n_targets
