"""TRADES' inner maximisation (Zhang et al. 2019): PGD on KL(clean || adversarial)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .pgd import PGD
from .validation import check_real

__all__ = ["TRADESAttack"]


class TRADESAttack(PGD):
    r"""The attack of TRADES, "Theoretically Principled Trade-off between Robustness and
    Accuracy" [https://arxiv.org/abs/1901.08573].

    Distance measure: Linf.

    :class:`~attacks.PGD` with loss ``"kl"``: maximise ``KL(p(x) || p(x_adv))`` against the clean
    prediction ``p(x)`` (labels unused by the loss), starting from ``x + init_std * N(0, 1)``,
    as in the TRADES code (``perturb_steps=10``, ``step_size = eps / 4`` by default, e.g. 0.007
    for eps 0.031). Same as torchattacks' ``TPGD``.

    Args:
        model: classifier taking inputs in [0, 1].
        eps: maximum perturbation (required).
        alpha: step size. (Default: ``None`` = ``2.5 * eps / steps``, i.e. ``eps / 4`` at 10 steps)
        steps: number of steps. (Default: 10)
        init_std: standard deviation of the Gaussian start. (Default: 0.001)
        bn_mode: ``"eval"`` or ``"train"``. (Default: "eval", as the TRADES code)
        seed: ``None`` (global RNG) or an int (own generator). (Default: None)
        channels_last: as in :class:`~attacks.PGD`. (Default: False)

    Shape:
        - x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)`` int64 (unused); output: ``(N, C, H, W)``.

    Cost: ``steps`` forward+backward passes per example plus one clean forward without gradient.

    Examples::
        >>> x_adv = TRADESAttack(model, eps=0.031, alpha=0.007, steps=10)(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        *,
        init_std: float = 0.001,
        bn_mode: str = "eval",
        seed: int | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            model,
            eps,
            alpha,
            steps,
            True,
            loss="kl",
            bn_mode=bn_mode,
            seed=seed,
            channels_last=channels_last,
        )
        self.init_std = check_real("init_std", init_std)

    def _init_delta(self, x: Tensor) -> Tensor:
        return self._rand(x, "normal").mul_(self.init_std)

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "alpha": self.alpha,
            "steps": self.steps,
            "init_std": self.init_std,
            "loss": self._loss.name,
            "bn_mode": self.bn_mode,
            "seed": self.seed,
            "channels_last": self.channels_last,
        }
