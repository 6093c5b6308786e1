"""Argument checks shared by the attacks and the library: one clear error for a bad number.

The lowest layer of the project (``attacks`` imports nothing from ``robust_agc``), so
``robust_agc.utils.validation`` re-exports these instead of repeating them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_real"]


def check_int(name: str, value: Any, *, minimum: int, type_error: bool = False) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``.

    Raises:
        ValueError: ``value`` is below ``minimum``, or not an integer when ``type_error`` is false.
        TypeError: ``value`` is not an integer and ``type_error`` is true.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if type_error:
            raise TypeError(f"Invalid {name} value: {value!r} (expected an int)")
        raise ValueError(f"Invalid {name} value: {value!r}")
    if value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    open_minimum: bool = False,
    type_error: bool = False,
) -> float:
    """``value`` as a float if it is a finite real (not a bool) >= ``minimum`` (> with
    ``open_minimum``).

    Raises:
        ValueError: out of range or not finite, or not a real number when ``type_error`` is false.
        TypeError: ``value`` is not a real number and ``type_error`` is true.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if type_error:
            raise TypeError(f"Invalid {name} value: {value!r} (expected a float)")
        raise ValueError(f"Invalid {name} value: {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (open_minimum and v == minimum):
        raise ValueError(f"Invalid {name} value: {value!r}")
    return v
