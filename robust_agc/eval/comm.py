"""The processes of a distributed evaluation: object collectives and the round-robin chunk schedule.

Chunk ``b`` runs on rank ``b % world_size``; a chunk is the same points with the same seed whichever
rank runs it, so the per-point results do not depend on the number of processes. Rank and world
size come from :func:`robust_agc.utils.dist_info`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from ..utils import dist_info

__all__ = ["Comm"]


class Comm:
    """The ``torch.distributed`` process group of an evaluation, or one process on its own.

    Collectives carry picklable CPU objects (``all_gather_object``/``broadcast_object_list``), so the
    same code serves ``gloo`` and ``nccl`` (with ``nccl``, the caller sets the CUDA device).
    """

    def __init__(self) -> None:
        self.rank, self.world = dist_info()

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that reads and writes files, logs and warns)."""
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        buf = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(buf, src=0)
        return buf[0]

    def rounds(
        self, n_chunks: int, start: int, fn: Callable[[int], Any]
    ) -> Iterator[tuple[int, list[Any]]]:
        """Run ``fn(b)`` for chunks ``b = start, start + 1, ...`` round-robin over the ranks.

        Round ``r`` gives chunk ``s + rank`` (``s = start + r * world``) to each rank; yields
        ``(s, results)`` with every rank's result of the round in chunk order, on every rank.
        """
        for s in range(start, n_chunks, self.world):
            b = s + self.rank
            local = fn(b) if b < n_chunks else None
            yield s, [r for r in self.all_gather(local) if r is not None]
