"""Robust pruning: HYDRA, magnitude pruning (LWM) and iterative magnitude pruning (IMP), as stages
chained by checkpoints (docs/usage.md, "Robust pruning").

- :mod:`~robust_agc.prune.magnitude`: top-k mask selection (:func:`magnitude_masks`,
  :func:`top_masks`), IMP's densities (:func:`imp_densities`), :func:`register_masks`;
- :mod:`~robust_agc.prune.scores`: HYDRA's scores and straight-through top-k
  (:func:`attach_scores`);
- :mod:`~robust_agc.prune.filter_scores`: HYDRA's scores per filter, gated where each channel is
  read (:func:`attach_filter_scores`, :func:`fold_filter_score_state`);
- :mod:`~robust_agc.prune.source`: a stage's source checkpoint, what ``--init-from`` takes from
  it, provenance (:func:`load_source`);
- :mod:`~robust_agc.prune.pipeline`: :func:`prune`, the stage runner and the pipeline record.

Example::

    from robust_agc.prune import prune
    record = prune("runs/dense/best.pt", method="hydra", sparsity=0.99, out="runs/hydra99",
                   epochs=20, optimizer="agc")
"""

from typing import Any

from .filter_scores import FilterScores, attach_filter_scores, fold_filter_score_state
from .magnitude import SCOPES, imp_densities, magnitude_masks, register_masks, top_masks
from .scores import ScoredWeight, ScoreMasks, attach_scores, scaled_score_init
from .source import InitSource, load_source

__all__ = [
    "METHODS",
    "SCOPES",
    "FilterScores",
    "InitSource",
    "ScoreMasks",
    "ScoredWeight",
    "attach_filter_scores",
    "attach_scores",
    "fold_filter_score_state",
    "imp_densities",
    "load_source",
    "magnitude_masks",
    "prune",
    "register_masks",
    "scaled_score_init",
    "top_masks",
]


def __getattr__(name: str) -> Any:  # lazy: the pipeline imports robust_agc.train, which uses us
    if name in ("prune", "METHODS"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'robust_agc.prune' has no attribute {name!r}")
