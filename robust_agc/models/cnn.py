"""Small CNNs of the adversarial-robustness literature (MNIST-sized and CIFAR-sized inputs)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .layers import Normalize, width
from .registry import register_model

__all__ = ["SmallCNN", "MnistCNN"]


class SmallCNN(nn.Module):
    """The TRADES "SmallCNN": 4 conv (32, 32, 64, 64) + 3 fc (200, 200, classes).

    The original has dropout 0.5 before the second fc layer; it is off by default here because the
    AGC snapshot gradient must see the same function as the current-weight gradient (dropout would
    draw a different mask for each). ``dropout > 0`` restores it.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dropout: float = 0.0,
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        c = [width(widths, f"features.{i}", d) for i, d in ((0, 32), (2, 32), (5, 64), (7, 64))]
        f1, f2 = width(widths, "classifier.1", 200), width(widths, "classifier.4", 200)
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 3),
            nn.ReLU(),
            nn.Conv2d(c[0], c[1], 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c[1], c[2], 3),
            nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((input_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[3] * side * side, f1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MnistCNN(nn.Module):
    """Madry et al.'s MNIST network: conv5x5-32, pool, conv5x5-64, pool, fc-1024, fc."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        c0, c1 = width(widths, "features.0", 32), width(widths, "features.3", 64)
        f1 = width(widths, "classifier.1", 1024)
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c0, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c0, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c1 * side * side, f1),
            nn.ReLU(),
            nn.Linear(f1, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


@register_model("small-cnn")
def small_cnn(**kw: object) -> nn.Module:
    """TRADES SmallCNN (4 conv + 3 fc), no BatchNorm."""
    return SmallCNN(**kw)  # type: ignore[arg-type]


@register_model("mnist-cnn")
def mnist_cnn(**kw: object) -> nn.Module:
    """Madry's MNIST CNN (2 conv + 2 fc), no BatchNorm."""
    return MnistCNN(**kw)  # type: ignore[arg-type]
