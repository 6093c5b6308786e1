"""Pre-activation ResNet-18 (He et al. 2016) and Wide ResNet (Zagoruyko & Komodakis), CIFAR variants."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Normalize
from .registry import register_model

__all__ = ["PreActResNet", "WideResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv pre-activation basic block."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 28x28 or 32x32 inputs (global average pooling before the fc)."""

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers = []
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class WideResNet(nn.Module):
    """WRN-depth-widen (depth = 6n + 4) of pre-activation basic blocks."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Invalid depth value: {depth} (must be 6n + 4)")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(self.normalize(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("preact-resnet18")
def preact_resnet18(*, num_classes: int, in_channels: int, input_size: int, mean, std) -> nn.Module:
    """PreAct-ResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)


@register_model("wrn-28-4")
def wrn_28_4(*, num_classes: int, in_channels: int, input_size: int, mean, std) -> nn.Module:
    """Wide ResNet 28-4."""
    return WideResNet(28, 4, num_classes, in_channels, mean, std)
