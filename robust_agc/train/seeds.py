"""The named random streams of a training run, each derived from ``cfg.seed`` in one place.

A run draws from several independent streams; each is named here with the one formula that seeds
it, so a reader can see every stream at once and no offset is repeated elsewhere. The values are
those of the original trainer, so runs stay bit-identical across versions:

============== ======================================== =======================================
stream         seed                                     used by
============== ======================================== =======================================
``global``     ``seed``                                 model init, attack random starts
``eval_attack`` ``seed + 1``                            the per-epoch PGD evaluation
``masks``      ``seed + 7``                             the initial sparse masks
``topology``   ``seed + 11``                            the topology scheduler (SET, BSR-Net)
``agc_refresh`` ``seed + 17``                           which batches an AGC refresh uses
``grad_align``  ``seed + 23``                           GradAlign's noise (``--grad-align``)
rank starts    ``seed + 1_000_003 * rank``              the global RNG of rank > 0 (DDP)
reseeded       ``seed + 7919 * epoch + 1_000_003 * rank`` resuming on another world size
============== ======================================== =======================================

The data order is seeded by :func:`robust_agc.data.epoch_seed` (``seed * 1_000_003 + epoch``),
which lives with the batch iterator.
"""

from __future__ import annotations

import torch

__all__ = [
    "EPOCH_STRIDE",
    "RANK_STRIDE",
    "STREAM_OFFSETS",
    "rank_seed",
    "reseeded_rank_seed",
    "stream_generator",
    "stream_seed",
]

STREAM_OFFSETS: dict[str, int] = {
    "global": 0,
    "eval_attack": 1,
    "masks": 7,
    "topology": 11,
    "agc_refresh": 17,
    "grad_align": 23,
}
"""Offset of each named stream from the run's seed."""

RANK_STRIDE = 1_000_003
"""Distance between the global-RNG seeds of consecutive ranks (distinct attack starts per rank)."""

EPOCH_STRIDE = 7919
"""Distance between the reseeded global-RNG seeds of consecutive epochs (another world size)."""


def stream_seed(seed: int, name: str) -> int:
    """The seed of stream ``name`` (a key of :data:`STREAM_OFFSETS`) of a run seeded ``seed``."""
    if name not in STREAM_OFFSETS:
        raise ValueError(f"Invalid name value: {name!r} (one of {', '.join(STREAM_OFFSETS)})")
    return seed + STREAM_OFFSETS[name]


def stream_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded with :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, name))


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of ``rank`` in a data-parallel run (distinct attack random starts)."""
    return seed + RANK_STRIDE * rank


def reseeded_rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The global-RNG seed of ``rank`` when a run resumes at ``epoch`` on another world size
    (the saved per-rank states do not fit, so the attack random starts are reseeded)."""
    return seed + EPOCH_STRIDE * epoch + RANK_STRIDE * rank
