"""VGG-16 with BatchNorm, CIFAR variant (one fc layer after global pooling)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .layers import Normalize, width
from .registry import register_model

__all__ = ["VGG"]

_CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm; max-pools that would shrink the map below 1x1 are skipped (28x28 inputs)."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int,
        in_channels: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c, side = in_channels, input_size
        for v in cfg:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
            else:
                out = width(widths, f"features.{len(layers)}", int(v))
                layers += [
                    nn.Conv2d(c, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(),
                ]
                c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


@register_model("vgg16")
def vgg16(
    *, num_classes: int, in_channels: int, input_size: int, mean, std, widths=None
) -> nn.Module:
    """VGG-16-BN (CIFAR variant)."""
    return VGG(_CFG16, num_classes, in_channels, input_size, mean, std, widths)
