"""The common base of every attack: device, model mode, randomness, projection, validation.

Every attack is bound to a model at construction and called as ``attack(x, y) -> x_adv``, the call
shape of torchattacks, so attacks of either library can be passed where the other's are expected.
Inputs are images in [0, 1] (the model normalizes inside, RobustBench convention).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .validation import check_int, check_real

__all__ = ["Attack", "NORMS", "BN_MODES"]

logger = logging.getLogger(__name__)

NORMS: tuple[str, ...] = ("Linf", "L2")
"""Threat models: L-infinity and L2 balls around the clean input."""

BN_MODES: tuple[str, ...] = ("eval", "train")
"""Model mode during the attack: ``"eval"`` (frozen BatchNorm statistics) or ``"train"``."""


def _check_eps(eps: Any, norm: str) -> float:
    """Validate a perturbation budget and warn about the usual slips."""
    v = check_real("eps", eps)
    if v == 0.0:
        warnings.warn("eps=0: the attack returns the clean inputs unchanged", stacklevel=3)
    elif norm == "Linf" and v > 1.0:
        warnings.warn(
            f"eps={v} exceeds the [0, 1] input range of an L-inf attack; did you mean {v}/255?",
            stacklevel=3,
        )
    return v


def _module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``model`` for the block, then restore it.

    With the parameters frozen, autograd records no weight-gradient edges and saves no tensors for
    them, so an input-gradient pass (an attack step) does a little less work (about 1-5% less CPU
    time per PGD step for ``small-cnn``/``mnist-cnn`` on one thread here), with bit-identical
    input gradients. Parameters that did not require gradients stay untouched; the flags are
    restored on error too. Not for use while another thread trains the same model.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class Attack(abc.ABC):
    """Base class of all attacks: ``Attack(model, ...)(x, y) -> x_adv``.

    The base class does, once per call: move ``x`` and ``y`` to the model's device, switch the
    model to the attack's mode (``bn_mode``) and restore every submodule's mode afterwards (even on
    error), enable autograd (so attacks work inside ``torch.no_grad()`` evaluation code), and apply
    the final projection onto the eps-ball (``norm``) and [0, 1]. Subclasses implement
    :meth:`_perturb` and :attr:`cost_per_example`.

    Gradients are taken with respect to the input only (``torch.autograd.grad``) with the
    model's parameters frozen for the call (:func:`frozen_parameters`): no weight gradient is
    computed or kept, and parameter ``.grad`` fields are never written.

    Args:
        model: the classifier, taking inputs in [0, 1] and returning logits.
        eps: perturbation budget in ``norm``; ``None`` means no eps-ball (only [0, 1]).
        norm: ``"Linf"`` or ``"L2"``.
        bn_mode: ``"eval"`` (default: ``model.eval()`` during the attack) or ``"train"``
            (``model.train()`` during the attack). Train mode normalizes with batch statistics
            **and updates the BatchNorm running statistics** with every attack step's forward pass
            (and applies dropout); the mode each submodule had is restored afterwards.
        seed: ``None`` draws random starts from the global torch RNG (so a trainer that saves and
            restores the global RNG state resumes bit for bit); an int gives the attack its own
            CPU ``torch.Generator`` seeded once, whose stream continues across calls (see
            :meth:`get_rng_state`), so the same seed gives the same outputs on any device.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None,
        norm: str = "Linf",
        bn_mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Invalid model value: expected an nn.Module, got {type(model).__name__}"
            )
        if norm not in NORMS:
            raise ValueError(f"Invalid norm value: {norm!r} (choose from {', '.join(NORMS)})")
        if bn_mode not in BN_MODES:
            raise ValueError(f"Invalid bn_mode value: {bn_mode!r} (choose from eval, train)")
        if seed is not None:
            check_int("seed", seed, minimum=0)
        self.model = model
        self.norm = norm
        self.eps = None if eps is None else _check_eps(eps, norm)
        self.bn_mode = bn_mode
        self.seed = seed
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ public interface
    @property
    def device(self) -> torch.device:
        """The model's device (inputs are moved there; ``x_adv`` is returned there)."""
        return _module_device(self.model)

    @property
    @abc.abstractmethod
    def cost_per_example(self) -> int:
        """Forward+backward passes spent per example per call, at most (forward-only passes for
        bookkeeping, such as a clean prediction or the restart selection, are not counted)."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Craft adversarial examples.

        Args:
            x: images in [0, 1], shape ``(N, ...)`` (NCHW for images), floating point.
            y: labels, shape ``(N,)``, int64.

        Returns:
            ``x_adv``, detached, same shape and dtype as ``x``, on the model's device, inside the
            eps-ball around ``x`` and inside [0, 1].
        """
        x, y = self._check_inputs(x, y)
        if x.shape[0] == 0:
            return x.clone()
        saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.bn_mode == "train")
        try:
            with frozen_parameters(self.model), torch.enable_grad():
                x_adv = self._perturb(x, y)
        finally:
            for m, training in saved:
                m.training = training
        with torch.no_grad():
            return self.project(x_adv.detach(), x)

    forward = __call__  # torchattacks spells the attack body ``forward``

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` (in ``norm``) and onto [0, 1].

        Returns a new tensor (the arguments are not modified).
        """
        if self.eps is None:
            return x_adv.clamp(0.0, 1.0)
        if self.norm == "Linf":
            return torch.clamp(x_adv, min=x - self.eps, max=x + self.eps).clamp_(0.0, 1.0)
        delta = x_adv - x
        dims = tuple(range(1, delta.dim()))
        norms = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
        factor = (self.eps / norms.clamp_min(1e-12)).clamp_(max=1.0)
        return delta.mul_(factor).add_(x).clamp_(0.0, 1.0)

    def get_rng_state(self) -> Tensor | None:
        """State of the attack's own generator (``None`` when ``seed`` is None)."""
        g = self._get_generator()
        return None if g is None else g.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore a state returned by :meth:`get_rng_state` (for bit-exact resumption)."""
        g = self._get_generator()
        if g is None:
            raise ValueError("Invalid state value: this attack has no generator (seed=None)")
        g.set_state(state)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}(model={type(self.model).__name__}, {fields})"

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial examples for ``x`` (on the model's device, model already in the
        attack's mode, autograd enabled); the base class projects the result."""

    def _repr_fields(self) -> dict[str, Any]:
        """The threat model and settings shown by ``repr`` (subclasses extend it)."""
        return {"eps": self.eps, "norm": self.norm, "bn_mode": self.bn_mode, "seed": self.seed}

    def _get_generator(self) -> torch.Generator | None:
        """The attack's own CPU generator, seeded from ``seed`` on first use (``None``: global RNG).

        The generator lives on the CPU whatever the data's device, so a seeded attack draws the
        same random starts on every device.
        """
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def _rand(self, like: Tensor, kind: str) -> Tensor:
        """Random tensor shaped like ``like``: ``"uniform"`` in [0, 1) or ``"normal"`` N(0, 1).

        Drawn from the attack's generator (on the CPU, then moved) when seeded, else from the
        global RNG of ``like``'s device.
        """
        g = self._get_generator()
        device = like.device if g is None else torch.device("cpu")
        fn = torch.rand if kind == "uniform" else torch.randn
        r = fn(like.shape, generator=g, dtype=like.dtype, device=device)
        return r.to(like.device, memory_format=torch.preserve_format)

    def _check_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError(
                f"Invalid x value: expected a floating tensor (N, ...), got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else (x.dtype, tuple(x.shape))}"
            )
        if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64:
            raise ValueError(
                "Invalid y value: expected an int64 tensor of shape (N,), got "
                f"{type(y).__name__ if not isinstance(y, Tensor) else (y.dtype, tuple(y.shape))}"
            )
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"Invalid y value: {y.shape[0]} labels for {x.shape[0]} inputs")
        device = self.device
        x = x.detach().to(device)
        y = y.detach().to(device)
        if x.numel() and (bool(x.min() < 0.0) or bool(x.max() > 1.0)):
            raise ValueError(
                f"Invalid x value: inputs must lie in [0, 1] (models normalize inside), "
                f"got range [{x.min().item():.4g}, {x.max().item():.4g}]"
            )
        return x, y
