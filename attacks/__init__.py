"""Adversarial attacks on a common base (torchattacks call shape, depends on torch only).

>>> from attacks import PGD, create_attack, list_attacks
>>> x_adv = PGD(model, eps=0.1, steps=10)(x, y)
>>> x_adv = create_attack("pgd", model, eps=0.1, steps=10)(x, y)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import (
    TORCHATTACKS_PREFIX,
    TorchattacksAdapter,
    as_torchattacks,
    check_torchattacks_name,
    torchattacks_attack,
)
from .base import BN_MODES, NORMS, Attack, frozen_parameters
from .fgsm import FGSM
from .fgsmrs import FGSMRS
from .losses import LOSSES, cross_entropy, dlr, kl_divergence, resolve_loss
from .nfgsm import NFGSM
from .pgd import PGD
from .pgdl2 import PGDL2
from .trades import TRADESAttack

__all__ = [
    "Attack",
    "FGSM",
    "FGSMRS",
    "NFGSM",
    "PGD",
    "PGDL2",
    "TRADESAttack",
    "TORCHATTACKS_PREFIX",
    "TorchattacksAdapter",
    "as_torchattacks",
    "check_attack_name",
    "torchattacks_attack",
    "create_attack",
    "frozen_parameters",
    "list_attacks",
    "LOSSES",
    "NORMS",
    "BN_MODES",
    "cross_entropy",
    "kl_divergence",
    "dlr",
    "resolve_loss",
]

_REGISTRY: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "fgsm-rs": FGSMRS,
    "n-fgsm": NFGSM,
    "pgd": PGD,
    "pgd-l2": PGDL2,
    "trades": TRADESAttack,
}


def list_attacks() -> list[str]:
    """Names accepted by :func:`create_attack`."""
    return sorted(_REGISTRY)


def create_attack(name: str, model: nn.Module, **kwargs: Any) -> Attack:
    """Build a registered attack: ``create_attack("pgd", model, eps=0.1, steps=10)``, or one of
    torchattacks by ``"torchattacks:NAME"`` (``eps``, ``alpha``, ``steps``, ``bn_mode``, ``seed``;
    :func:`~attacks.adapters.torchattacks_attack`).

    Args:
        name: one of :func:`list_attacks` (``"pgd"``, ``"pgd-l2"``, ``"fgsm"``, ``"fgsm-rs"``,
            ``"n-fgsm"``, ``"trades"``), or ``"torchattacks:NAME"``.
        model: the classifier to attack.
        **kwargs: the attack's arguments (``eps`` is always required).
    """
    if name.startswith(TORCHATTACKS_PREFIX):
        return torchattacks_attack(name, model, **kwargs)
    check_attack_name(name)
    return _REGISTRY[name](model, **kwargs)


def check_attack_name(name: str) -> None:
    """Raise :class:`ValueError` unless :func:`create_attack` knows ``name``."""
    if name.startswith(TORCHATTACKS_PREFIX):
        check_torchattacks_name(name)
    elif name not in _REGISTRY:
        raise ValueError(
            f"Invalid attack value: {name!r} (choose from {', '.join(list_attacks())}, or "
            f"{TORCHATTACKS_PREFIX}NAME)"
        )
