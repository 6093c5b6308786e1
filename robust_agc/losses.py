"""Training objectives: natural, PGD-AT, TRADES, MART, as pure functions of logits and as objects.

The pure functions reproduce the reference implementations' values (TRADES:
``yaodongyu/TRADES/trades.py``; MART: ``YisenWang/MART/mart.py``), constants included. An
:class:`Objective` bundles a loss with what the trainer needs: whether it wants adversarial
inputs, how many forwards it costs, its default attack, and ``objective(model, x, x_adv, y)``,
which runs the model and returns ``(scalar loss, logits for training accuracy)``. That callable only
calls ``model(...)``, so the AGC optimizer can re-evaluate it at the snapshot weights through a
wrapper module.

>>> objective = get_objective("trades", beta=6.0)
>>> attack = objective.default_attack(model, eps=0.1, alpha=0.01, steps=10)
>>> loss, logits = objective(model, x, attack(x, y), y)
"""

from __future__ import annotations

import abc
import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import PGD, Attack, TRADESAttack

__all__ = [
    "natural_loss",
    "pgd_at_loss",
    "trades_loss",
    "mart_loss",
    "grad_align_penalty",
    "Objective",
    "get_objective",
    "list_objectives",
]

logger = logging.getLogger(__name__)


def natural_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy on clean inputs (standard training)."""
    return F.cross_entropy(logits, y)


def pgd_at_loss(logits_adv: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy on adversarial inputs (Madry et al.'s PGD adversarial training)."""
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float = 6.0) -> Tensor:
    """TRADES: ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``, KL summed and divided by the batch
    size ("batchmean"), gradients flowing through both the clean and adversarial logits.

    Args:
        logits_clean: logits at the clean inputs, ``(N, K)``.
        logits_adv: logits at the adversarial inputs, ``(N, K)``.
        y: labels, ``(N,)``.
        beta: weight of the robustness term. (Default: 6.0)
    """
    n = logits_clean.shape[0]
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    kl = F.kl_div(log_p_adv, log_p_clean, reduction="sum", log_target=True) / n
    return F.cross_entropy(logits_clean, y) + beta * kl


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float = 6.0) -> Tensor:
    """MART (Wang et al. 2020), as in the authors' code.

    ``BCE(p(x_adv), y) + beta * mean_i[KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i))]``, where the
    boosted cross-entropy is ``CE(x_adv, y) - log(1.0001 - p_{y'}(x_adv))`` with ``y'`` the most
    likely wrong class at ``x_adv``; the constants (1.0001, 1e-12, 1.0000001) are the code's.

    Args:
        logits_clean: logits at the clean inputs, ``(N, K)``.
        logits_adv: logits at the adversarial inputs, ``(N, K)``.
        y: labels, ``(N,)``.
        beta: weight of the robustness term. (Default: 6.0)
    """
    n = logits_clean.shape[0]
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = adv_probs.topk(2, dim=1).indices
    new_y = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y
    )
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    loss_robust = (kl * (1.0000001 - true_probs)).sum() / n
    return loss_adv + beta * loss_robust


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool) -> Tensor:
    """``grad_x`` of the summed cross-entropy at ``x`` (each row: its own example's gradient)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(_float32_logits(model(x)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad.flatten(1)


def grad_align_penalty(model: nn.Module, x: Tensor, y: Tensor, eta: Tensor) -> Tensor:
    """GradAlign's regulariser without its weight (Andriushchenko & Flammarion 2020,
    https://arxiv.org/abs/2007.02617): ``1 - mean_i cos(g_i(x_i), g_i(x_i + eta_i))`` with
    ``g_i`` the input gradient of example ``i``'s cross-entropy.

    As the authors' code (github.com/tml-epfl/understanding-fast-adv-training, ``train.py``): the
    gradient at ``x`` is a constant (no graph), the one at ``x + eta`` keeps its graph, so the
    penalty's weight gradient is a double backpropagation through it; ``x + eta`` is not clipped
    to [0, 1]; examples with a zero gradient at either point are left out of the mean (a penalty
    of 0 with a graph when none is left). The model runs in its current mode.

    Args:
        model: the classifier (its parameters receive the gradient through ``backward``).
        x: clean inputs ``(N, ...)``.
        y: labels ``(N,)``.
        eta: the noise, shaped like ``x`` (the paper draws ``U(-eps, eps)``).

    Cost: three forward+backward passes per example (two input gradients, then the double
    backward through the second).
    """
    g_clean = _input_grad(model, x, y, create_graph=False)
    g_noisy = _input_grad(model, x + eta, y, create_graph=True)
    n_clean, n_noisy = g_clean.norm(dim=1), g_noisy.norm(dim=1)
    keep = (n_clean != 0) & (n_noisy != 0)
    if not bool(keep.any()):
        return g_noisy.sum() * 0.0
    cos = (g_clean[keep] / n_clean[keep, None] * (g_noisy[keep] / n_noisy[keep, None])).sum(1)
    return 1.0 - cos.mean()


def _float32_logits(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) as float32; any other dtype unchanged (the same tensor)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


class Objective(abc.ABC):
    """A training objective: the loss, its cost, and its default attack.

    Attributes:
        name: registry name (``"natural"``, ``"pgd-at"``, ``"trades"``, ``"mart"``).
        needs_adversarial: whether ``x_adv`` is used (False only for ``natural``).
        forwards_per_step: model forwards one call costs (1 for natural and pgd-at, 2 for
            trades and mart, which also run the clean inputs).
        beta: weight of the robustness term (trades, mart; ``None`` otherwise).
    """

    name: str = ""
    needs_adversarial: bool = True
    forwards_per_step: int = 1

    def __init__(self, beta: float | None = None) -> None:
        self.beta = beta

    def default_attack(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float,
        steps: int,
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> Attack | None:
        """The attack this objective trains against: PGD-CE with a uniform random start
        (pgd-at, mart), the TRADES KL attack (trades), or ``None`` (natural)."""
        return PGD(model, eps, alpha, steps, True, loss="ce", bn_mode=bn_mode, seed=seed)

    @abc.abstractmethod
    def loss(self, logits_clean: Tensor | None, logits_adv: Tensor | None, y: Tensor) -> Tensor:
        """The loss from logits (``logits_clean`` is ``None`` for pgd-at, ``logits_adv`` for
        natural)."""

    def __call__(
        self, model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Run the model and return ``(scalar loss, logits for training accuracy)``.

        The logits are the adversarial ones (the clean ones for ``natural``); half-precision logits
        (under ``torch.autocast``) are cast to float32 first, so the loss, with its small constants
        (MART's 1e-12), is computed in float32. Only ``model(...)`` is called (clean first, then
        adversarial, as separate forwards: BatchNorm in train mode sees each batch on its own, as in
        the reference code).

        Raises:
            ValueError: ``x_adv`` is ``None`` for an objective that needs it, or shapes differ.
        """
        if not self.needs_adversarial:
            logits = _float32_logits(model(x))
            return self.loss(logits, None, y), logits
        if x_adv is None:
            raise ValueError(f"Invalid x_adv value: None (objective {self.name!r} needs it)")
        if x_adv.shape != x.shape:
            raise ValueError(
                f"Invalid x_adv value: shape {tuple(x_adv.shape)} differs from x {tuple(x.shape)}"
            )
        logits_clean = _float32_logits(model(x)) if self.forwards_per_step == 2 else None
        logits_adv = _float32_logits(model(x_adv))
        return self.loss(logits_clean, logits_adv, y), logits_adv

    def __repr__(self) -> str:
        beta = f", beta={self.beta}" if self.beta is not None else ""
        return f"Objective(name={self.name!r}{beta})"


class _Natural(Objective):
    name = "natural"
    needs_adversarial = False
    forwards_per_step = 1

    def default_attack(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float,
        steps: int,
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> Attack | None:
        return None

    def loss(self, logits_clean: Tensor | None, logits_adv: Tensor | None, y: Tensor) -> Tensor:
        assert logits_clean is not None
        return natural_loss(logits_clean, y)


class _PGDAT(Objective):
    name = "pgd-at"
    needs_adversarial = True
    forwards_per_step = 1

    def loss(self, logits_clean: Tensor | None, logits_adv: Tensor | None, y: Tensor) -> Tensor:
        assert logits_adv is not None
        return pgd_at_loss(logits_adv, y)


class _TRADES(Objective):
    name = "trades"
    needs_adversarial = True
    forwards_per_step = 2

    def default_attack(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float,
        steps: int,
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> Attack | None:
        return TRADESAttack(model, eps, alpha, steps, bn_mode=bn_mode, seed=seed)

    def loss(self, logits_clean: Tensor | None, logits_adv: Tensor | None, y: Tensor) -> Tensor:
        assert logits_clean is not None and logits_adv is not None and self.beta is not None
        return trades_loss(logits_clean, logits_adv, y, self.beta)


class _MART(Objective):
    name = "mart"
    needs_adversarial = True
    forwards_per_step = 2

    def loss(self, logits_clean: Tensor | None, logits_adv: Tensor | None, y: Tensor) -> Tensor:
        assert logits_clean is not None and logits_adv is not None and self.beta is not None
        return mart_loss(logits_clean, logits_adv, y, self.beta)


_OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (_Natural, _PGDAT, _TRADES, _MART)}
_USES_BETA = ("trades", "mart")


def list_objectives() -> list[str]:
    """Names accepted by :func:`get_objective`."""
    return list(_OBJECTIVES)


def get_objective(name: str, *, beta: float = 6.0) -> Objective:
    """Build an objective by name.

    Args:
        name: ``"natural"``, ``"pgd-at"``, ``"trades"`` or ``"mart"``.
        beta: robustness weight for trades and mart (ignored, with a warning when changed, by
            the others). (Default: 6.0)
    """
    if name not in _OBJECTIVES:
        raise ValueError(
            f"Invalid objective value: {name!r} (choose from {', '.join(list_objectives())})"
        )
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
        raise ValueError(f"Invalid beta value: {beta!r}")
    if beta < 0:
        raise ValueError(f"Invalid beta value: {beta!r}")
    if name in _USES_BETA:
        return _OBJECTIVES[name](float(beta))
    if beta != 6.0:
        warnings.warn(f"beta={beta} is ignored by the {name!r} objective", stacklevel=2)
    return _OBJECTIVES[name](None)
