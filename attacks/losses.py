"""Per-example attack objectives, selectable by name: ``"ce"``, ``"kl"``, ``"dlr"``.

An attack maximises its loss. Each built-in loss returns one value per example; the attack takes
the gradient of their sum, so an example's step does not depend on the batch size. A user callable
``(logits, y_or_target) -> loss`` may return per-example values (shape ``(N,)``) or their mean (a
scalar; its gradient only differs by the factor ``1/N``, which the sign and L2-normalized steps
ignore).

Mixed precision: under ``torch.autocast`` the model's float16/bfloat16 logits are cast to float32
before the loss (``AttackLoss`` does it), so softmax, the DLR ratio and their gradients run in
float32; float32 and float64 logits are used as they are. The input gradient then flows back through
the model in the reduced precision. Its magnitude does not matter to the sign step of FGSM/PGD (nor
to the normalized L2 step), so the attack loss is not rescaled; only coordinates whose gradient
underflows to exactly zero in float16 take no step. Measured on a trained ``small-cnn`` (256
Fashion-MNIST test points, CPU autocast): 0.3% of the input-gradient coordinates underflow in
float16 (0.03% in bfloat16), and the sign agrees with float32 on 99.0% (float16) and 96.7%
(bfloat16) of the coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cross_entropy", "kl_divergence", "dlr", "LOSSES", "resolve_loss", "AttackLoss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _float32_logits(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) as float32; any other dtype unchanged (the same tensor)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy ``-log softmax(logits)[y]``, shape ``(N,)``."""
    return F.cross_entropy(logits, y, reduction="none")


def kl_divergence(logits: Tensor, log_p_clean: Tensor) -> Tensor:
    """Per-example ``KL(p_clean || softmax(logits))`` (TRADES' inner objective), shape ``(N,)``.

    Args:
        logits: logits at the adversarial point.
        log_p_clean: log-probabilities of the clean prediction (the target distribution).
    """
    log_q = F.log_softmax(logits, dim=1)
    return F.kl_div(log_q, log_p_clean, reduction="none", log_target=True).sum(dim=1)


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example Difference-of-Logits-Ratio loss (Croce & Hein 2020), shape ``(N,)``.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, with ``z_pi`` the sorted logits;
    invariant to shifting and rescaling the logits. Needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"Invalid logits value: DLR needs >= 3 classes, got {logits.shape[1]}")
    z_sorted, idx_sorted = logits.sort(dim=1)
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    top_is_y = idx_sorted[:, -1] == y
    z_other = torch.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "kl": kl_divergence, "dlr": dlr}
"""Built-in attack losses by name."""


@dataclass(frozen=True)
class AttackLoss:
    """A resolved attack loss.

    Attributes:
        name: the built-in name, or the callable's ``__name__``.
        fn: ``(logits, y_or_target) -> per-example or mean loss``.
        needs_clean: the target is the clean prediction's log-probabilities (``"kl"``), which
            costs one forward pass without gradient per call, rather than the labels.
    """

    name: str
    fn: LossFn
    needs_clean: bool = False

    def target(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """What ``fn`` compares against: ``y``, or the clean log-probabilities for ``"kl"``."""
        if not self.needs_clean:
            return y
        with torch.no_grad():
            return F.log_softmax(_float32_logits(model(x)), dim=1)

    def objective(self, logits: Tensor, target: Tensor) -> Tensor:
        """The scalar whose input gradient the attack follows (sum of per-example values)."""
        logits = _float32_logits(logits)
        out = self.fn(logits, target)
        if out.dim() == 1 and out.shape[0] == logits.shape[0]:
            return out.sum()
        if out.dim() == 0:
            return out
        raise ValueError(
            f"Invalid loss value: {self.name} returned shape {tuple(out.shape)}, expected "
            f"({logits.shape[0]},) or a scalar"
        )

    def per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-example values, shape ``(N,)`` (a scalar-returning callable is called per row)."""
        logits = _float32_logits(logits)
        out = self.fn(logits, target)
        if out.dim() == 1 and out.shape[0] == logits.shape[0]:
            return out
        if out.dim() == 0:
            n = logits.shape[0]
            if n == 1:
                return out.reshape(1)
            return torch.stack([self.fn(logits[i : i + 1], target[i : i + 1]) for i in range(n)])
        raise ValueError(
            f"Invalid loss value: {self.name} returned shape {tuple(out.shape)}, expected "
            f"({logits.shape[0]},) or a scalar"
        )


def resolve_loss(loss: str | LossFn) -> AttackLoss:
    """Turn ``"ce"``, ``"kl"``, ``"dlr"`` or a callable into an :class:`AttackLoss`."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"Invalid loss value: {loss!r} (choose from {', '.join(LOSSES)})")
        return AttackLoss(loss, LOSSES[loss], needs_clean=loss == "kl")
    if callable(loss):
        return AttackLoss(getattr(loss, "__name__", type(loss).__name__), loss)
    raise ValueError(f"Invalid loss value: {loss!r}")
