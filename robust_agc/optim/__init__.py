"""Optimizers: AGC (adaptive gradient correction), its interface, passes, registry and probe.

- :mod:`.agc`: the :class:`AGC` optimizer and its functional kernel :func:`agc`;
- :mod:`.passes`: the extra passes (gradients at the snapshot, the refresh's full gradient, their
  reductions over ranks) without side effects on the model;
- :mod:`.protocol`: :class:`CorrectedOptimizer`, what the rest of the library may ask of AGC;
- :mod:`.registry`: optimizers by name (:func:`create_optimizer`, :func:`list_optimizers`);
- :mod:`.probe`: the gradient-variance probe (:func:`gradient_variance`).

The method is described in ``docs/agc.md``.
"""

from robust_agc.optim.agc import AGC, COEF_MODES, ESTIMATORS, agc, corrected_gradient
from robust_agc.optim.probe import gradient_variance
from robust_agc.optim.protocol import CorrectedOptimizer, is_corrected
from robust_agc.optim.registry import (
    create_optimizer,
    list_optimizers,
    optimizer_kwargs,
    register_optimizer,
)

__all__ = [
    "AGC",
    "COEF_MODES",
    "CorrectedOptimizer",
    "ESTIMATORS",
    "agc",
    "corrected_gradient",
    "create_optimizer",
    "gradient_variance",
    "is_corrected",
    "list_optimizers",
    "optimizer_kwargs",
    "register_optimizer",
]
