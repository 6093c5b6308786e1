"""Moved: the gradient-variance probe now lives in :mod:`robust_agc.optim.probe`.

This module re-exports its public names so ``from robust_agc.probe import gradient_variance``
keeps working.
"""

from .optim.probe import gradient_variance

__all__ = ["gradient_variance"]
