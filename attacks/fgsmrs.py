"""FGSM with a random start ("Fast is better than free", Wong et al. 2020)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .losses import LossFn
from .pgd import PGD
from .validation import check_real

__all__ = ["FGSMRS"]


class FGSMRS(PGD):
    r"""FGSM with random start from "Fast is better than free: Revisiting adversarial training"
    [https://arxiv.org/abs/2001.03994].

    Distance measure: Linf.

    ``delta ~ U(-eps, eps)``, then one signed-gradient step of size ``alpha`` (default
    ``1.25 * eps``) from ``x + delta``, projected onto the eps-ball and [0, 1].

    Args:
        model: classifier taking inputs in [0, 1].
        eps: maximum perturbation (required).
        alpha: step size. (Default: ``None`` = ``1.25 * eps``, the paper's choice)
        restarts: random restarts, as in :class:`~attacks.PGD`. (Default: 1)
        loss: ``"ce"``, ``"kl"``, ``"dlr"`` or a callable. (Default: ``"ce"``)
        bn_mode: ``"eval"`` or ``"train"``. (Default: "eval")
        seed: ``None`` (global RNG) or an int (own generator). (Default: None)

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64; output: ``(N, C, H, W)``.

    Examples::
        >>> x_adv = FGSMRS(model, eps=8 / 255, alpha=10 / 255)(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        *,
        restarts: int = 1,
        loss: str | LossFn = "ce",
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        if alpha is not None:
            check_real("alpha", alpha, open_minimum=True)
        super().__init__(
            model, eps, alpha, 1, True, restarts=restarts, loss=loss, bn_mode=bn_mode, seed=seed
        )
        assert self.eps is not None
        if alpha is None and self.eps > 0.0:
            self.alpha = 1.25 * self.eps

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "alpha": self.alpha,
            "restarts": self.restarts,
            "loss": self._loss.name,
            "bn_mode": self.bn_mode,
            "seed": self.seed,
        }
