"""N-FGSM: noisy, unclipped FGSM (de Jorge et al. 2022), a single-step attack for fast training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Attack
from .losses import AttackLoss, LossFn, resolve_loss
from .validation import check_real

__all__ = ["NFGSM"]


class NFGSM(Attack):
    r"""N-FGSM from "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training"
    [https://arxiv.org/abs/2202.01181].

    Distance measure: Linf (the radius ``eps`` scales the noise; the result is **not** projected
    onto the eps-ball).

    ``eta ~ U(-noise * eps, noise * eps)``, ``x_0 = clip_[0,1](x + eta)``, then one signed-gradient
    step ``x_adv = clip_[0,1](x_0 + alpha * sign(grad_x loss(x_0, y)))``. Only [0, 1] is enforced,
    so ``|x_adv - x|_inf`` can reach ``noise * eps + alpha`` (``3 * eps`` with the defaults): the
    paper's point is that the larger, unclipped perturbation, together with the noise, avoids
    catastrophic overfitting without extra cost. Meant for training; an evaluation against this
    attack is not an eps-ball robustness number.

    Args:
        model: classifier taking inputs in [0, 1].
        eps: the nominal radius (required); the noise spans ``noise * eps``.
        alpha: step size. (Default: ``None`` = ``eps``, the paper's choice)
        noise: noise multiplier ``k``, ``>= 0``. (Default: 2.0, the paper's choice)
        loss: ``"ce"``, ``"kl"``, ``"dlr"`` or a callable. (Default: ``"ce"``)
        bn_mode: ``"eval"`` or ``"train"``. (Default: "eval")
        seed: ``None`` (global RNG) or an int (own generator). (Default: None)

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64; output: ``(N, C, H, W)``.

    Cost: one forward+backward pass per example (:attr:`cost_per_example`).

    Examples::
        >>> x_adv = NFGSM(model, eps=8 / 255)(x, y)  # noise 16/255, step 8/255
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        *,
        noise: float = 2.0,
        loss: str | LossFn = "ce",
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps=eps, norm="Linf", bn_mode=bn_mode, seed=seed)
        assert self.eps is not None
        self.noise = check_real("noise", noise)
        self.alpha = self.eps if alpha is None else check_real("alpha", alpha, open_minimum=True)
        self._loss: AttackLoss = resolve_loss(loss)

    @property
    def cost_per_example(self) -> int:
        """One forward+backward pass per example."""
        return 1

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Clamp to [0, 1] only: N-FGSM does not project onto the eps-ball (a new tensor)."""
        return x_adv.clamp(0.0, 1.0)

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "alpha": self.alpha,
            "noise": self.noise,
            "loss": self._loss.name,
            "bn_mode": self.bn_mode,
            "seed": self.seed,
        }

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        assert self.eps is not None
        radius = self.noise * self.eps
        eta = self._rand(x, "uniform").mul_(2.0 * radius).sub_(radius)
        x0 = (x + eta).clamp_(0.0, 1.0).requires_grad_(True)
        target = self._loss.target(self.model, x, y)
        (grad,) = torch.autograd.grad(self._loss.objective(self.model(x0), target), x0)
        with torch.no_grad():
            return x0.detach().add_(grad.sign(), alpha=self.alpha)
