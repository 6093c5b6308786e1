"""Old home of the gradient-masking checks; they live in :mod:`robust_agc.eval.checks` now.

This shim re-exports the public names so ``from robust_agc.checks import ...`` keeps working.
"""

from .eval.checks import *  # noqa: F403  (the public names, listed by its __all__)
from .eval.checks import __all__  # noqa: F401
