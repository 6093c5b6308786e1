"""robust_agc: adversarially robust sparse training with adaptive gradient correction (AGC).

The pieces, each usable on its own:

- :class:`robust_agc.optim.AGC` (``create_optimizer``): the corrected-gradient optimizer;
- :mod:`robust_agc.sparse`: masks, density allocation and topology schedulers;
- :mod:`robust_agc.losses`: PGD-AT, TRADES and MART objectives (attacks live in the ``attacks`` package);
- :mod:`robust_agc.models`, :mod:`robust_agc.data`: architectures and datasets;
- :func:`robust_agc.train.train` / :class:`robust_agc.train.Trainer`: the training loop;
- :func:`robust_agc.eval.benchmark` / :func:`robust_agc.eval.load_model`: RobustBench-style evaluation;
- :mod:`robust_agc.reporting`: tables and plots over seeds from run folders and results;
- :mod:`robust_agc.cli`: the ``robust-agc`` program.

The method: ``docs/agc.md``; the layout: ``docs/architecture.md``.
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .losses import Objective, get_objective, list_objectives  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .optim import AGC, corrected_gradient, create_optimizer, list_optimizers  # noqa: E402
from .sparse import apply_masks, create_scheduler, fold_masks, list_sparse_methods  # noqa: E402

__all__ = [
    "AGC",
    "Objective",
    "TrainConfig",
    "__version__",
    "apply_masks",
    "corrected_gradient",
    "create_model",
    "create_optimizer",
    "create_scheduler",
    "fold_masks",
    "get_objective",
    "list_models",
    "list_objectives",
    "list_optimizers",
    "list_sparse_methods",
]


def __getattr__(name: str):  # lazy: evaluation pulls in pyautoattack
    if name in ("benchmark", "load_model"):
        from . import eval as _eval

        return getattr(_eval, name)
    raise AttributeError(f"module 'robust_agc' has no attribute {name!r}")
