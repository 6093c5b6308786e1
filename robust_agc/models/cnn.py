"""Small CNNs of the adversarial-robustness literature (MNIST-sized and CIFAR-sized inputs)."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import Normalize
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
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((input_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 200),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
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
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024),
            nn.ReLU(),
            nn.Linear(1024, num_classes),
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
