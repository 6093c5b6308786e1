"""Fast gradient sign method (Goodfellow et al. 2015)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .losses import LossFn
from .pgd import PGD

__all__ = ["FGSM"]


class FGSM(PGD):
    r"""FGSM from "Explaining and Harnessing Adversarial Examples"
    [https://arxiv.org/abs/1412.6572].

    Distance measure: Linf.

    ``x_adv = clip_[0,1](x + eps * sign(grad_x loss(x, y)))``: one step of :class:`~attacks.PGD`
    with ``alpha = eps`` and no random start (deterministic; ``seed`` is accepted for a uniform
    interface and unused).

    Args:
        model: classifier taking inputs in [0, 1].
        eps: maximum perturbation (required).
        loss: ``"ce"``, ``"kl"``, ``"dlr"`` or a callable. (Default: ``"ce"``)
        bn_mode: ``"eval"`` or ``"train"``. (Default: "eval")
        seed: unused (no randomness). (Default: None)

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64; output: ``(N, C, H, W)``.

    Examples::
        >>> x_adv = FGSM(model, eps=8 / 255)(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        *,
        loss: str | LossFn = "ce",
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps, None, 1, False, loss=loss, bn_mode=bn_mode, seed=seed)
        assert self.eps is not None
        if self.eps > 0.0:
            self.alpha = self.eps

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "loss": self._loss.name,
            "bn_mode": self.bn_mode,
            "seed": self.seed,
        }
