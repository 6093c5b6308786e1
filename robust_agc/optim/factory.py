"""Moved: the optimizer factory is now the registry, :mod:`robust_agc.optim.registry`.

This module re-exports its public names so ``from robust_agc.optim.factory import
create_optimizer, list_optimizers`` keeps working.
"""

from .registry import create_optimizer, list_optimizers, optimizer_kwargs, register_optimizer

__all__ = ["create_optimizer", "list_optimizers", "optimizer_kwargs", "register_optimizer"]
