"""The registry behind :func:`create_model` (timm style)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import UserError
from .layers import init_weights

__all__ = ["INITS", "register_model", "create_model", "list_models", "model_from_config"]

INITS: tuple[str, ...] = ("he", "default")
"""Weight initialisations of :func:`create_model`: He-normal fan-in, or each layer's own."""

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes, in_channels, input_size, mean, std)``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def model_from_config(cfg: Mapping[str, Any], widths: Mapping[str, int] | None = None) -> nn.Module:
    """The architecture a run's recorded config describes (``model``, ``num_classes``,
    ``in_channels``, ``input_size``), at ``widths`` for a structurally pruned one; a
    :class:`KeyError` names a missing entry."""
    return create_model(
        cfg["model"],
        num_classes=int(cfg["num_classes"]),
        in_channels=int(cfg["in_channels"]),
        input_size=int(cfg["input_size"]),
        widths=widths,
    )


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    init: str = "he",
    widths: Mapping[str, int] | None = None,
) -> nn.Module:
    """Build a registered architecture.

    Args:
        name: one of :func:`list_models`.
        num_classes: number of outputs (logits).
        in_channels: 1 (MNIST-like) or 3 (CIFAR-like).
        input_size: image side (28 or 32).
        mean, std: per-channel normalization applied inside the model (inputs stay in [0, 1]);
            ``None`` means no normalization.
        init: ``"he"`` (He-normal fan-in for conv/linear, zero bias; see ``docs/protocols.md``
            section 3) or ``"default"`` (PyTorch's).
        widths: output width of conv/linear layers by qualified name, for a structurally pruned
            model (:func:`robust_agc.sparse.export_structured`); unnamed layers keep their
            default width. Every name must be a conv/linear layer of the architecture with that
            width in the built model (else :class:`UserError`).
    """
    if name not in _REGISTRY:
        raise UserError(f"Invalid model value: {name!r} (choose from {', '.join(list_models())})")
    if num_classes < 2:
        raise UserError(f"Invalid num_classes value: {num_classes}")
    if in_channels < 1:
        raise UserError(f"Invalid in_channels value: {in_channels}")
    if input_size < 8:
        raise UserError(f"Invalid input_size value: {input_size}")
    if init not in INITS:
        raise UserError(f"Invalid init value: {init!r} (choose he or default)")
    if mean is None:
        mean = (0.0,) * in_channels
    if std is None:
        std = (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    kw: dict[str, object] = {} if widths is None else {"widths": dict(widths)}
    try:
        model = _REGISTRY[name](
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            **kw,
        )
    except (TypeError, ValueError) as e:
        if widths is None:
            raise
        raise UserError(f"Invalid widths value for model {name!r}: {e}") from None
    if widths is not None:
        _check_widths(name, model, widths)
    if init == "he":
        init_weights(model)
    return model


def _check_widths(name: str, model: nn.Module, widths: Mapping[str, int]) -> None:
    """Every entry of ``widths`` names a conv/linear layer of ``model`` that has that width."""
    layers = {
        n: m.out_channels if hasattr(m, "out_channels") else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
    }
    for key, value in widths.items():
        if layers.get(key) != value:
            raise UserError(
                f"Invalid widths value: {key!r}: {value!r} does not fit model {name!r} "
                f"(its width there: {layers.get(key)})"
            )
