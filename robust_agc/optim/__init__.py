"""Optimizers: AGC (adaptive gradient correction) with its functional kernel, and a factory."""

from robust_agc.optim.agc import AGC, COEF_MODES, ESTIMATORS, agc, corrected_gradient
from robust_agc.optim.factory import create_optimizer, list_optimizers
from robust_agc.optim.protocol import CorrectedOptimizer, is_corrected

__all__ = [
    "AGC",
    "COEF_MODES",
    "CorrectedOptimizer",
    "ESTIMATORS",
    "agc",
    "corrected_gradient",
    "create_optimizer",
    "is_corrected",
    "list_optimizers",
]
