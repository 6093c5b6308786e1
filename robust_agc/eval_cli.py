"""Former home of the ``eval`` sub-command: it lives in :mod:`robust_agc.cli.eval` now.

Kept so that ``from robust_agc.eval_cli import add_eval_arguments, run_eval`` keeps working.
"""

from .cli.eval import add_eval_arguments, run_eval

__all__ = ["add_eval_arguments", "run_eval"]
