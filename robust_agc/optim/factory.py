"""Optimizer factory (timm style): ``create_optimizer(name, params, lr=...)``, ``list_optimizers()``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from robust_agc.optim.agc import AGC

__all__ = ["create_optimizer", "list_optimizers"]

_NAMES: tuple[str, ...] = ("adam", "adamw", "agc", "sgd", "svrg")
_AGC_KEYS = frozenset(
    {
        "dampening",
        "gamma",
        "alpha",
        "tau_init",
        "estimator",
        "coef",
        "fixed_coef",
        "foreach",
        "maximize",
    }
)
_SGD_KEYS = frozenset({"dampening", "foreach", "maximize"})
_ADAM_KEYS = frozenset({"betas", "eps", "amsgrad", "foreach", "maximize"})


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`, sorted."""
    return list(_NAMES)


def create_optimizer(
    name: str,
    params: ParamsT,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    **agc_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    - ``"sgd"``: ``torch.optim.SGD`` (L2 weight decay, Nesterov momentum by default); extra
      keywords: ``dampening``, ``foreach``, ``maximize``.
    - ``"agc"``: :class:`~robust_agc.optim.AGC` with the adaptive coefficient (``coef`` may not be
      overridden); extra keywords: any AGC hyperparameter (``gamma``, ``alpha``, ``tau_init``,
      ``estimator``, ``dampening``, ``foreach``, ``maximize``).
    - ``"svrg"``: :class:`AGC` with a non-adaptive coefficient, the ablation baseline:
      ``coef="fixed"`` (default, ``c = fixed_coef``, default 0.1) or ``coef="ramp"`` (the public
      release's ``c = gamma * (1 - (1 - alpha) ** e)``).
    - ``"adam"`` / ``"adamw"``: ``torch.optim.Adam`` (L2) / ``AdamW`` (decoupled decay);
      ``momentum`` is used as ``beta1`` unless ``betas`` is given, ``nesterov`` is ignored; extra
      keywords: ``betas``, ``eps``, ``amsgrad``, ``foreach``, ``maximize``.

    Args:
        name: one of :func:`list_optimizers`.
        params: parameters or param groups.
        lr: learning rate.
        momentum: momentum factor (``beta1`` for Adam).
        nesterov: Nesterov momentum (SGD/AGC; requires ``momentum > 0``).
        weight_decay: weight decay.
        **agc_kwargs: optimizer-specific keywords listed above.

    Raises:
        ValueError: unknown name, a keyword the optimizer does not take, or an invalid value.
    """
    if not isinstance(name, str) or name.lower() not in _NAMES:
        raise ValueError(f"Invalid name value: {name!r} (available: {', '.join(_NAMES)})")
    name = name.lower()
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    allowed = {
        "sgd": _SGD_KEYS,
        "agc": _AGC_KEYS - {"coef", "fixed_coef"},
        "svrg": _AGC_KEYS - {"estimator"},
        "adam": _ADAM_KEYS,
        "adamw": _ADAM_KEYS,
    }[name]
    unknown = sorted(set(agc_kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"Invalid keyword value: {', '.join(unknown)} for optimizer {name!r} "
            f"(accepted: {', '.join(sorted(allowed))})"
        )
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            **agc_kwargs,
        )
    if name == "agc":
        return AGC(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            coef="adaptive",
            **agc_kwargs,
        )
    if name == "svrg":
        kwargs = dict(agc_kwargs)
        coef = kwargs.pop("coef", "fixed")
        if coef not in ("fixed", "ramp"):
            raise ValueError(f"Invalid coef value: {coef!r} (svrg takes 'fixed' or 'ramp')")
        return AGC(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            coef=coef,
            **kwargs,
        )
    kwargs = dict(agc_kwargs)
    betas = kwargs.pop("betas", (momentum, 0.999))
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)
