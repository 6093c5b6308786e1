"""Old home of the gradient-masking checks; they live in :mod:`robust_agc.eval.checks` now.

This shim re-exports the public names so ``from robust_agc.checks import ...`` keeps working.
"""

from .eval.checks import (
    FLAG_NAMES,
    CheckResult,
    GradientMaskingWarning,
    MaskingReport,
    check_count_agreement,
    check_deterministic,
    check_n_classes,
    check_pgd_steps,
    check_probability_output,
    check_square_beats_gradient,
    check_zero_gradients,
    run_model_checks,
)

__all__ = [
    "FLAG_NAMES",
    "GradientMaskingWarning",
    "CheckResult",
    "MaskingReport",
    "check_deterministic",
    "check_probability_output",
    "check_zero_gradients",
    "check_n_classes",
    "check_square_beats_gradient",
    "check_pgd_steps",
    "check_count_agreement",
    "run_model_checks",
]
