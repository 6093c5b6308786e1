"""Numbers over seeds: ``mean ± std`` formatting and Student-t intervals (the one formatter the
report tables and the study summaries share)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["as_percent", "mean_std", "mean_ci"]


def as_percent(value: float) -> float:
    """An accuracy in percent: values <= 1 in magnitude are fractions (x 100), others already %."""
    return 100.0 * value if abs(value) <= 1.0 else value


def mean_std(values: Sequence[float | None], *, pct: bool = False, digits: int = 2) -> str:
    """``"mean ± std"`` over the values that are not None (sample std; the mean alone for one value).

    Args:
        values: one number per seed; None entries (a missing metric) are skipped.
        pct: values are fractions in [0, 1]: print them in percent.
        digits: decimals of both numbers.

    Returns:
        The formatted pair, or ``"-"`` when no value is present.
    """
    vals = [(as_percent(v) if pct else v) for v in values if v is not None]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student-t confidence interval at ``level`` (None skipped).

    With one value the interval is unbounded (``-inf, +inf``): one pair says nothing about the
    spread. Raises ValueError when no value is present."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        raise ValueError("no values")
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, -math.inf, math.inf
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, len(vals) - 1)) * statistics.stdev(vals)
    half /= math.sqrt(len(vals))
    return m, m - half, m + half
