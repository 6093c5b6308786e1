"""Training: the :class:`Trainer` loop and :func:`train`, which runs one configuration end to end
and writes the run folder (``config.yaml``, ``metrics.jsonl``, ``last.pt``/``best.pt``,
``summary.json``).

Where things live:

- :mod:`~robust_agc.train.trainer`: the loop (:class:`Trainer`, :func:`train`);
- :mod:`~robust_agc.train.build`: config -> model, masks, optimizer, objective, attack, topology;
- :mod:`~robust_agc.train.amp`: autocast, the float16 loss scaler and its skip rule;
- :mod:`~robust_agc.train.seeds`: the named random streams of a run;
- :mod:`~robust_agc.train.run_dir`: the run folder, metrics, summary and the resume check;
- :mod:`~robust_agc.train.accuracy`: :func:`evaluate_accuracy`.

The method the loop trains with is described in ``docs/agc.md``.
"""

from ..utils.machine import cpu_model
from .accuracy import evaluate_accuracy
from .build import mask_buffer_names
from .run_dir import METRIC_FIELDS, TIMING_FIELDS, default_run_dir
from .trainer import RunState, Trainer, train

__all__ = [
    "METRIC_FIELDS",
    "TIMING_FIELDS",
    "RunState",
    "Trainer",
    "cpu_model",
    "default_run_dir",
    "evaluate_accuracy",
    "mask_buffer_names",
    "train",
]
