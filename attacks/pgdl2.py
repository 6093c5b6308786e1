"""Projected gradient descent in the L2 norm (Madry et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from .pgd import PGD

__all__ = ["PGDL2"]


class PGDL2(PGD):
    r"""PGD in the L2 norm, from "Towards Deep Learning Models Resistant to Adversarial Attacks"
    [https://arxiv.org/abs/1706.06083].

    Distance measure: L2.

    Each step moves ``alpha`` along the per-example L2-normalized input gradient, then projects
    onto the L2 ball of radius ``eps`` and onto [0, 1]. The random start is uniform in radius
    (a Gaussian direction scaled to ``U(0, 1) * eps``), as in torchattacks' ``PGDL2``.

    Args:
        model: classifier taking inputs in [0, 1].
        eps: L2 radius (required).
        alpha: step size. (Default: ``None`` = ``2.5 * eps / steps``)
        steps: number of steps. (Default: 10)
        random_start: random start in the ball. (Default: True)
        restarts, loss, early_stop, bn_mode, seed, channels_last: as in :class:`~attacks.PGD`.

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64; output: ``(N, C, H, W)``.

    Examples::
        >>> attack = PGDL2(model, eps=0.5, alpha=0.1, steps=10)
        >>> x_adv = attack(x, y)
    """

    _norm = "L2"

    def _init_delta(self, x: Tensor) -> Tensor:
        assert self.eps is not None
        direction = self._rand(x, "normal")
        dims = tuple(range(1, x.dim()))
        norms = torch.linalg.vector_norm(direction, dim=dims, keepdim=True).clamp_min_(1e-12)
        radius = self._rand(norms, "uniform").mul_(self.eps)
        return direction.mul_(radius / norms)

    def _bounds(self, x: Tensor) -> tuple[Tensor, ...]:
        return ()

    def _step_(self, x_adv: Tensor, grad: Tensor, x: Tensor, bounds: tuple[Tensor, ...]) -> Tensor:
        assert self.eps is not None
        dims = tuple(range(1, x.dim()))
        g_norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True).add_(1e-12)
        x_adv.add_(grad.div_(g_norm), alpha=self.alpha)
        delta = x_adv.sub_(x)  # x_adv now holds the perturbation
        d_norm = torch.linalg.vector_norm(delta, dim=dims, keepdim=True).clamp_min_(1e-12)
        delta.mul_((self.eps / d_norm).clamp_(max=1.0))
        return delta.add_(x).clamp_(0.0, 1.0)
