"""Warnings that point at the user's line, however deep in a package they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["warn_at_caller"]


def warn_at_caller(message: str, category: type[Warning] = UserWarning, *, inside: str) -> None:
    """``warnings.warn(message, category)`` attributed to the first calling frame whose file is
    not under the folder ``inside`` (e.g. ``Path(__file__).parent`` of a package): the user's
    call, whichever chain of builders and constructors inside the package led to the warning."""
    root = str(Path(inside).resolve())
    frame = sys._getframe(1)
    level = 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(root):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
