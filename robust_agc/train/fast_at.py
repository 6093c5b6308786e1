"""Fast adversarial training pieces of the trainer: free adversarial training's carried
perturbation, and the catastrophic-overfitting guard.

- :class:`FreePerturbation`: the perturbation ``delta`` of free adversarial training (Shafahi et
  al. 2019, https://arxiv.org/abs/1904.12843, Algorithm 1): zero at the start of training, one
  signed step ``delta <- clip_eps(delta + alpha * sign(grad_delta loss))`` per replay, from the
  backward pass that also gives the optimizer its gradient, and carried over to the next
  minibatch (its first rows, when the batch is smaller, as the authors' code does).
- :func:`detect_collapse` and :class:`CollapseGuard`: catastrophic overfitting (Wong et al. 2020,
  https://arxiv.org/abs/2001.03994, section 5.2) shows as PGD accuracy collapsing while single-step
  (FGSM) accuracy stays high or rises; the guard watches the per-epoch validation accuracies and
  flags an epoch when PGD accuracy falls far below FGSM accuracy on the same points, or far below
  the best PGD accuracy of the epochs not flagged, or when training diverged (the weights are no
  longer finite). What the trainer does then is ``docs/usage.md`` ("Fast adversarial training").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["CollapseGuard", "FreePerturbation", "detect_collapse"]


class FreePerturbation:
    """The carried perturbation of free adversarial training (replays of one minibatch).

    Use per replay: ``x_adv = free.start(x)`` (``clip_[0,1](x + delta)``, differentiable with
    respect to the perturbation), run the objective on ``x_adv`` and back-propagate, then
    ``free.step_(eps=..., alpha=...)`` moves ``delta`` by one signed step of the gradient that
    backward pass left on it and clips it to ``[-eps, eps]``.
    """

    def __init__(self) -> None:
        self.delta: Tensor | None = None
        self._leaf: Tensor | None = None

    def start(self, x: Tensor) -> Tensor:
        """``clip_[0,1](x + delta[:n])`` with ``delta[:n]`` a fresh leaf that requires grad."""
        n = x.shape[0]
        if self.delta is None or self.delta.shape[0] < n or self.delta.shape[1:] != x.shape[1:]:
            grown = torch.zeros_like(x, memory_format=torch.contiguous_format)
            if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
                grown[: self.delta.shape[0]] = self.delta
            self.delta = grown
        self._leaf = self.delta[:n].clone().requires_grad_(True)
        return (x.detach() + self._leaf).clamp(0.0, 1.0)

    @torch.no_grad()
    def step_(self, *, eps: float, alpha: float) -> None:
        """One signed step of the perturbation along the gradient the last backward pass left on
        it, clipped to ``[-eps, eps]`` (a non-finite gradient entry counts as zero)."""
        leaf, delta = self._leaf, self.delta
        if leaf is None or delta is None:
            raise RuntimeError("FreePerturbation.step_ called before start()")
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        sign = torch.nan_to_num(grad.sign(), nan=0.0)
        n = leaf.shape[0]
        delta[:n] = (leaf.detach() + alpha * sign).clamp_(-eps, eps)
        self._leaf = None

    def state_dict(self) -> dict[str, Any]:
        """The carried perturbation (an empty tensor before the first batch)."""
        return {"delta": torch.empty(0) if self.delta is None else self.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        delta = state["delta"]
        self.delta = None if delta.numel() == 0 else delta.detach().clone()
        self._leaf = None


def detect_collapse(
    fgsm_acc: float | None,
    pgd_acc: float,
    best_pgd_acc: float | None,
    *,
    gap: float,
    drop: float,
    finite: bool = True,
) -> list[str]:
    """The reasons to suspect catastrophic overfitting in one epoch's accuracies (empty: none).

    Args:
        fgsm_acc: single-step (FGSM) accuracy on the points (``None``: not measured).
        pgd_acc: PGD accuracy on the same points.
        best_pgd_acc: the best PGD accuracy of earlier epochs not flagged (``None``: none yet).
        gap: flag ``"gap"`` when ``fgsm_acc - pgd_acc > gap``.
        drop: flag ``"drop"`` when ``best_pgd_acc - pgd_acc > drop``.
        finite: whether the model's weights are finite after the epoch; flag ``"diverged"``
            when not. A diverged run sits at chance from then on, with no gap and, when it
            diverged before any epoch beat chance, no drop either: its accuracies alone would
            not flag it.

    A NaN accuracy (no points) flags nothing.
    """
    reasons = [] if finite else ["diverged"]
    if fgsm_acc is not None and fgsm_acc - pgd_acc > gap:
        reasons.append("gap")
    if best_pgd_acc is not None and best_pgd_acc - pgd_acc > drop:
        reasons.append("drop")
    return reasons


class CollapseGuard:
    """The per-epoch catastrophic-overfitting check and its state (checkpointed).

    Args:
        action: ``"warn"``, ``"stop"`` or ``"rollback"``.
        gap: threshold of :func:`detect_collapse`'s FGSM-PGD gap.
        drop: threshold of :func:`detect_collapse`'s drop from the best good epoch.

    Attributes:
        last_good_epoch: the last epoch not flagged (0: the initial state).
        best_robust: its best validation PGD accuracy so far among good epochs (``None``: none).
        flagged: the flagged epochs.
        stopped: the run ended on a flag (``stop``, ``rollback``).
        rolled_back_to: the epoch whose state a rollback restored (``None``: no rollback).
    """

    def __init__(self, action: str, *, gap: float, drop: float) -> None:
        if action not in ("warn", "stop", "rollback"):
            raise ValueError(f"Invalid action value: {action!r}")
        self.action, self.gap, self.drop = action, gap, drop
        self.last_good_epoch = 0
        self.best_robust: float | None = None
        self.flagged: list[int] = []
        self.stopped = False
        self.rolled_back_to: int | None = None

    def check(self, rec: dict[str, Any]) -> list[str]:
        """Judge one epoch's record (``epoch``, ``val_robust_acc``, ``val_fgsm_acc``, and
        ``nonfinite_weights`` when the trainer found non-finite weights): add ``collapse`` (and
        ``collapse_reasons`` when flagged) to it, update the state, return the reasons (empty: a
        good epoch)."""
        pgd = float(rec["val_robust_acc"])
        reasons = detect_collapse(
            rec.get("val_fgsm_acc"),
            pgd,
            self.best_robust,
            gap=self.gap,
            drop=self.drop,
            finite=not rec.get("nonfinite_weights", False),
        )
        rec["collapse"] = bool(reasons)
        if reasons:
            rec["collapse_reasons"] = reasons
            self.flagged.append(int(rec["epoch"]))
        else:
            self.last_good_epoch = int(rec["epoch"])
            if not math.isnan(pgd) and (self.best_robust is None or pgd > self.best_robust):
                self.best_robust = pgd
        return reasons

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (``weights_only`` checkpoints)."""
        return {
            "action": self.action,
            "last_good_epoch": self.last_good_epoch,
            "best_robust": self.best_robust,
            "flagged": list(self.flagged),
            "stopped": self.stopped,
            "rolled_back_to": self.rolled_back_to,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the action is the configuration's, not the saved one)."""
        self.last_good_epoch = int(state["last_good_epoch"])
        best = state["best_robust"]
        self.best_robust = None if best is None else float(best)
        self.flagged = [int(e) for e in state["flagged"]]
        self.stopped = bool(state["stopped"])
        rb = state["rolled_back_to"]
        self.rolled_back_to = None if rb is None else int(rb)
