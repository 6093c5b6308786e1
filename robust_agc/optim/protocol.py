"""What the rest of the library may ask of a gradient-correcting optimizer.

The trainer, the sparse methods and the variance probe talk to :class:`~robust_agc.optim.AGC`
through this interface only (never through ``optimizer.state`` and its key names), so another
SVRG-style optimizer that provides it plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["CorrectedOptimizer", "is_corrected"]


@runtime_checkable
class CorrectedOptimizer(Protocol):
    """An optimizer that corrects each step with a gradient at a snapshot point.

    ``snapshot_backward`` must run before every ``step``; ``refresh`` moves the snapshot.
    """

    @property
    def num_refreshes(self) -> int:
        """Refreshes done so far (a new snapshot and full gradient each)."""
        ...

    @property
    def coefficient(self) -> float:
        """The control-variate coefficient ``c`` the next step uses (first param group)."""
        ...

    def snapshot_backward(
        self, model: nn.Module, closure: Callable[[nn.Module], Tensor], **kwargs: Any
    ) -> Tensor | None:
        """The minibatch gradient at the snapshot for the coming step; returns its loss."""
        ...

    def snapshot_of(self, p: Tensor) -> Tensor | None:
        """The snapshot point of ``p``."""
        ...

    def full_gradient_of(self, p: Tensor) -> Tensor | None:
        """The full gradient at the snapshot for ``p``."""
        ...

    def stale_positions(self, p: Tensor) -> Tensor | None:
        """Positions of ``p`` whose full gradient is stale (pruned at the last refresh)."""
        ...

    def snapshot_gradients(self) -> list[Tensor]:
        """The snapshot gradients of the coming step."""
        ...

    def drop_correction_(self, p: Tensor, where: Tensor) -> None:
        """Use the plain gradient for ``p`` where ``where`` is True until the next refresh."""
        ...


def is_corrected(optimizer: object) -> bool:
    """Whether ``optimizer`` provides :class:`CorrectedOptimizer` (``AGC`` and its ``svrg`` form)."""
    return isinstance(optimizer, CorrectedOptimizer)
