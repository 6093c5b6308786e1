"""The optimizer registry (timm style): names -> builders, and the keywords a training config gives them.

:func:`create_optimizer` builds an optimizer by name with the shared hyperparameters (learning rate,
momentum, Nesterov, weight decay) and the keywords its registration accepts; :func:`list_optimizers`
is the one list of accepted names; :func:`optimizer_kwargs` turns a training configuration into
:func:`create_optimizer`'s keywords. A new optimizer plugs in with :func:`register_optimizer`, as a
new architecture does with :func:`robust_agc.models.register_model`::

    @register_optimizer("lion", keywords=("betas",))
    def build_lion(params, *, lr, momentum, nesterov, weight_decay, **kwargs):
        return Lion(params, lr=lr, weight_decay=weight_decay, **kwargs)

Registered here: ``sgd``, ``agc`` (the method, ``docs/agc.md``), ``svrg`` (AGC with a fixed or
ramped coefficient, ``docs/agc.md``, "Choosing the coefficient"), ``adam`` and ``adamw``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .agc import AGC

__all__ = [
    "OptimizerBuilder",
    "create_optimizer",
    "list_optimizers",
    "optimizer_kwargs",
    "register_optimizer",
]

#: ``builder(params, *, lr, momentum, nesterov, weight_decay, **keywords) -> optimizer``.
OptimizerBuilder = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class _Entry:
    """A registered optimizer: its builder, the extra keywords it takes, and those a config gives."""

    builder: OptimizerBuilder
    keywords: frozenset[str]
    from_config: Callable[[Any], dict[str, Any]]


_REGISTRY: dict[str, _Entry] = {}


def _no_config_keywords(cfg: Any) -> dict[str, Any]:
    return {}


def register_optimizer(
    name: str,
    *,
    keywords: Iterable[str] = (),
    from_config: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator registering an optimizer builder under ``name`` (lower case).

    Args:
        name: the name :func:`create_optimizer` accepts (case-insensitively there).
        keywords: the builder's extra keywords beyond ``lr``, ``momentum``, ``nesterov`` and
            ``weight_decay``; :func:`create_optimizer` refuses any other.
        from_config: ``from_config(cfg) -> {keyword: value}``, the extra keywords a training
            configuration gives this optimizer (see :func:`optimizer_kwargs`); default none.

    Raises:
        ValueError: ``name`` is not lower case or already registered.
    """
    if name != name.lower():
        raise ValueError(f"Invalid name value: {name!r} (optimizer names are lower case)")

    def deco(builder: OptimizerBuilder) -> OptimizerBuilder:
        if name in _REGISTRY:
            raise ValueError(f"optimizer {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, frozenset(keywords), from_config or _no_config_keywords)
        return builder

    return deco


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`, sorted (the one list of optimizer names)."""
    return sorted(_REGISTRY)


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
    - any name added with :func:`register_optimizer`.

    Args:
        name: one of :func:`list_optimizers` (case-insensitive).
        params: parameters or param groups.
        lr: learning rate.
        momentum: momentum factor (``beta1`` for Adam).
        nesterov: Nesterov momentum (SGD/AGC; requires ``momentum > 0``).
        weight_decay: weight decay.
        **agc_kwargs: optimizer-specific keywords listed above.

    Raises:
        ValueError: unknown name, a keyword the optimizer does not take, or an invalid value.
    """
    name = _checked_name(name)
    entry = _REGISTRY[name]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    unknown = sorted(set(agc_kwargs) - entry.keywords)
    if unknown:
        raise ValueError(
            f"Invalid keyword value: {', '.join(unknown)} for optimizer {name!r} "
            f"(accepted: {', '.join(sorted(entry.keywords))})"
        )
    return entry.builder(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        **agc_kwargs,
    )


def _checked_name(name: Any) -> str:
    """``name`` in lower case if it is registered, else ``ValueError``."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(
            f"Invalid name value: {name!r} (available: {', '.join(list_optimizers())})"
        )
    return name.lower()


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """The keywords of :func:`create_optimizer` that a training configuration gives.

    ``create_optimizer(cfg.optimizer, params, **optimizer_kwargs(cfg))`` builds the configured
    optimizer: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` from the config, plus the
    optimizer's own (``agc``: ``gamma``, ``alpha``, ``tau_init``, ``estimator`` from the
    ``agc_*`` fields; ``svrg``: ``coef`` from ``svrg_schedule`` and ``fixed_coef`` from
    ``svrg_coef``).

    Args:
        cfg: a :class:`robust_agc.config.TrainConfig` (or any object with its fields).

    Raises:
        ValueError: ``cfg.optimizer`` is not a registered name.
    """
    entry = _REGISTRY[_checked_name(cfg.optimizer)]
    return {
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "weight_decay": cfg.weight_decay,
        **entry.from_config(cfg),
    }


# --------------------------------------------------------------------------------------------
# the built-in optimizers
# --------------------------------------------------------------------------------------------

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
_ADAM_KEYS = frozenset({"betas", "eps", "amsgrad", "foreach", "maximize"})


def _agc_config(cfg: Any) -> dict[str, Any]:
    return dict(
        gamma=cfg.agc_gamma,
        alpha=cfg.agc_alpha,
        tau_init=cfg.agc_tau_init,
        estimator=cfg.agc_estimator,
    )


def _svrg_config(cfg: Any) -> dict[str, Any]:
    return dict(coef="ramp" if cfg.svrg_schedule == "ramp" else "fixed", fixed_coef=cfg.svrg_coef)


@register_optimizer("sgd", keywords=("dampening", "foreach", "maximize"))
def _build_sgd(params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **kwargs)


@register_optimizer("agc", keywords=_AGC_KEYS - {"coef", "fixed_coef"}, from_config=_agc_config)
def _build_agc(params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    return AGC(params, coef="adaptive", **kwargs)


@register_optimizer("svrg", keywords=_AGC_KEYS - {"estimator"}, from_config=_svrg_config)
def _build_svrg(params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    coef = kwargs.pop("coef", "fixed")
    if coef not in ("fixed", "ramp"):
        raise ValueError(f"Invalid coef value: {coef!r} (svrg takes 'fixed' or 'ramp')")
    return AGC(params, coef=coef, **kwargs)


@register_optimizer("adam", keywords=_ADAM_KEYS)
def _build_adam(
    params: ParamsT, *, momentum: float, nesterov: bool, **kwargs: Any
) -> torch.optim.Optimizer:
    betas = kwargs.pop("betas", (momentum, 0.999))  # nesterov: ignored
    return torch.optim.Adam(params, betas=betas, **kwargs)


@register_optimizer("adamw", keywords=_ADAM_KEYS)
def _build_adamw(
    params: ParamsT, *, momentum: float, nesterov: bool, **kwargs: Any
) -> torch.optim.Optimizer:
    betas = kwargs.pop("betas", (momentum, 0.999))  # nesterov: ignored
    return torch.optim.AdamW(params, betas=betas, **kwargs)
