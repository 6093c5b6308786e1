"""Optimizers: AGC (adaptive gradient correction) with its functional kernel, and a factory."""

from robust_agc.optim.agc import AGC, COEF_MODES, ESTIMATORS, agc, corrected_gradient
from robust_agc.optim.factory import create_optimizer, list_optimizers

__all__ = [
    "AGC",
    "COEF_MODES",
    "ESTIMATORS",
    "agc",
    "corrected_gradient",
    "create_optimizer",
    "list_optimizers",
]
