"""Projected gradient descent, L-infinity (Madry et al. 2018), with restarts and early stopping."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from .base import Attack
from .losses import AttackLoss, LossFn, resolve_loss
from .validation import check_int, check_real

__all__ = ["PGD"]

logger = logging.getLogger(__name__)


class PGD(Attack):
    r"""PGD from "Towards Deep Learning Models Resistant to Adversarial Attacks"
    [https://arxiv.org/abs/1706.06083].

    Distance measure: Linf.

    Each step: ``x_adv <- clip_{[0,1] and eps-ball}(x_adv + alpha * sign(grad_x loss))``.

    Args:
        model: classifier taking inputs in [0, 1].
        eps: maximum perturbation (required: library defaults are a trap).
        alpha: step size. (Default: ``None`` = ``2.5 * eps / steps``, Madry et al.'s rule)
        steps: number of steps. (Default: 10)
        random_start: start from a uniform point of the eps-ball. (Default: True)
        restarts: number of random restarts; a point counts as broken if any restart breaks it,
            and for each point the successful restart's ``x_adv`` is returned, else the one with
            the highest loss. Later restarts only attack the points still unbroken. (Default: 1)
        loss: ``"ce"``, ``"kl"`` (against the clean prediction), ``"dlr"``, or a callable
            ``(logits, y) -> per-example or mean loss``, maximised. (Default: ``"ce"``)
        early_stop: stop updating an example as soon as it is misclassified (the model's
            prediction differs from ``y``); the point where it was first misclassified is returned.
            Frozen examples are dropped from the batch, so later steps are cheaper. For
            evaluation. (Default: False)
        bn_mode: ``"eval"`` or ``"train"``; see :class:`~attacks.base.Attack`. (Default: "eval")
        seed: ``None`` (global RNG) or an int (own generator). (Default: None)
        channels_last: run the attack on ``channels_last`` tensors (faster convolutions when the
            model's weights are ``channels_last`` too; convert the model yourself). (Default: False)

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64; output: ``(N, C, H, W)``.

    Cost: ``steps * restarts`` forward+backward passes per example at most
    (:attr:`cost_per_example`); plus one forward without gradient per restart when
    ``restarts > 1`` (selection) and one per call for ``loss="kl"`` (clean prediction).

    Examples::
        >>> attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
        >>> x_adv = attack(x, y)
    """

    _norm = "Linf"

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        *,
        restarts: int = 1,
        loss: str | LossFn = "ce",
        early_stop: bool = False,
        bn_mode: str = "eval",
        seed: int | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, norm=self._norm, bn_mode=bn_mode, seed=seed)
        self.steps = check_int("steps", steps, minimum=1)
        self.alpha = (
            2.5 * self.eps / self.steps
            if alpha is None
            else check_real("alpha", alpha, open_minimum=True)
        )
        self.restarts = check_int("restarts", restarts, minimum=1)
        for name, flag in (
            ("random_start", random_start),
            ("early_stop", early_stop),
            ("channels_last", channels_last),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name} value: {flag!r}")
        self.random_start = random_start
        self.early_stop = early_stop
        self.channels_last = channels_last
        self._loss: AttackLoss = resolve_loss(loss)
        self.loss = loss  # the name (resolve_loss keeps it as the loss's name) or the callable

    @property
    def cost_per_example(self) -> int:
        """``steps * restarts``: forward+backward passes per example per call, at most."""
        return self.steps * self.restarts

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "alpha": self.alpha,
            "steps": self.steps,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self._loss.name,
            "early_stop": self.early_stop,
            "bn_mode": self.bn_mode,
            "seed": self.seed,
            "channels_last": self.channels_last,
        }

    # ------------------------------------------------------------------ norm-specific pieces
    def _init_delta(self, x: Tensor) -> Tensor:
        """Random start: uniform in the L-inf ball."""
        assert self.eps is not None
        return self._rand(x, "uniform").mul_(2.0 * self.eps).sub_(self.eps)

    def _bounds(self, x: Tensor) -> tuple[Tensor, ...]:
        """Per-coordinate box = eps-ball intersected with [0, 1], computed once per run."""
        assert self.eps is not None
        return (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)

    def _step_(self, x_adv: Tensor, grad: Tensor, x: Tensor, bounds: tuple[Tensor, ...]) -> Tensor:
        """One ascent step and projection, in place on ``x_adv`` (``grad`` may be overwritten)."""
        lo, hi = bounds
        return x_adv.add_(grad.sign_(), alpha=self.alpha).clamp_(min=lo, max=hi)

    # ------------------------------------------------------------------ the attack
    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = self._loss.target(self.model, x, y)
        best = self._run(x, y, target)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            logits = self.model(best)
            broken = logits.argmax(dim=1) != y
            best_loss = self._loss.per_example(logits, target)
            for r in range(1, self.restarts):
                todo = (~broken).nonzero().squeeze(1)
                logger.debug("restart %d: %d of %d points unbroken", r, todo.numel(), len(y))
                if todo.numel() == 0:
                    break
                with torch.enable_grad():
                    x_r = self._run(x[todo], y[todo], target[todo])
                logits = self.model(x_r)
                broken_r = logits.argmax(dim=1) != y[todo]
                loss_r = self._loss.per_example(logits, target[todo])
                take = broken_r | (loss_r > best_loss[todo])
                idx = todo[take]
                best[idx] = x_r[take]
                broken[idx] = broken_r[take]
                best_loss[idx] = loss_r[take]
        return best

    def _run(self, x: Tensor, y: Tensor, target: Tensor) -> Tensor:
        """One restart: ``steps`` projected ascent steps from a (random) start."""
        x_adv = self._start(x)
        bounds = self._bounds(x)
        out: Tensor | None = None  # the full batch, once early stopping has compacted the batch
        idx: Tensor | None = None  # indices (into out) of the examples still attacked
        for _ in range(self.steps):
            x_req = x_adv.detach().requires_grad_(True)
            logits = self.model(x_req)
            (grad,) = torch.autograd.grad(self._loss.objective(logits, target), x_req)
            if any(st == 0 and n > 1 for st, n in zip(grad.stride(), grad.shape)):
                grad = grad.clone()  # a broadcast gradient (e.g. of x.sum()): own memory for _step_
            if self.early_stop:
                keep = logits.detach().argmax(dim=1) == y
                if not bool(keep.all()):
                    # freeze the misclassified examples at their current point, attack the rest
                    if out is None:
                        out, idx = x_adv, torch.arange(len(y), device=y.device)
                    else:
                        out[idx] = x_adv
                    sel = keep.nonzero().squeeze(1)
                    idx = idx[sel]
                    if idx.numel() == 0:
                        return out
                    x_adv, grad, x, y = x_adv[sel], grad[sel], x[sel], y[sel]
                    target = target[sel]
                    bounds = tuple(b[sel] for b in bounds)
            with torch.no_grad():
                self._step_(x_adv, grad, x, bounds)
        if out is None:
            return x_adv
        out[idx] = x_adv
        return out

    def _start(self, x: Tensor) -> Tensor:
        """The starting point (a new tensor), projected."""
        if not self.random_start:
            return x.clone()
        x0 = x + self._init_delta(x)
        return self.project(x0, x)
