"""Pre-activation ResNet-18 (He et al. 2016) and Wide ResNet (Zagoruyko & Komodakis), CIFAR variants."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Normalize, width
from .registry import register_model

__all__ = ["PreActResNet", "WideResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv pre-activation basic block.

    ``mid`` (default ``planes``) is the width of the inner conv; ``shortcut`` (default: when the
    stride or the width changes) whether the skip path is a 1x1 conv. A structurally pruned block
    passes both, since its widths no longer tell whether the original had a shortcut conv.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        mid: int | None = None,
        shortcut: bool | None = None,
    ) -> None:
        super().__init__()
        mid = planes if mid is None else mid
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if shortcut is None:
            shortcut = stride != 1 or in_planes != planes
        if shortcut:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


def _blocks(
    plan: list[tuple[int, int]],
    default_in: int,
    in_planes: int,
    prefix: str,
    widths: Mapping[str, int] | None,
) -> list[PreActBlock]:
    """Blocks of ``(planes, stride)``; ``widths`` (by qualified layer name) override the inner and
    output widths, and the shortcut convs stay where the default widths put them."""
    blocks = []
    for k, (planes, stride) in enumerate(plan):
        out = width(widths, f"{prefix}.{k}.conv2", planes)
        mid = width(widths, f"{prefix}.{k}.conv1", planes)
        shortcut = stride != 1 or default_in != planes
        blocks.append(PreActBlock(in_planes, out, stride, mid=mid, shortcut=shortcut))
        default_in, in_planes = planes, out
    return blocks


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 28x28 or 32x32 inputs (global average pooling before the fc)."""

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        in_planes = width(widths, "conv1", 64)
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, stride=1, padding=1, bias=False)
        stages = zip((64, 128, 256, 512), num_blocks, strict=True)
        plan = [
            (p, 2 if i > 0 and j == 0 else 1) for i, (p, n) in enumerate(stages) for j in range(n)
        ]
        self.layers = nn.Sequential(*_blocks(plan, 64, in_planes, "layers", widths))
        in_planes = self.layers[-1].conv2.out_channels
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

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
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Invalid depth value: {depth} (must be 6n + 4)")
        n = (depth - 4) // 6
        stage = (16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(mean, std)
        in_planes = width(widths, "conv1", 16)
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, padding=1, bias=False)
        plan = [(p, 2 if i > 0 and j == 0 else 1) for i, p in enumerate(stage) for j in range(n)]
        self.blocks = nn.Sequential(*_blocks(plan, 16, in_planes, "blocks", widths))
        in_planes = self.blocks[-1].conv2.out_channels
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(self.normalize(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("preact-resnet18")
def preact_resnet18(
    *, num_classes: int, in_channels: int, input_size: int, mean, std, widths=None
) -> nn.Module:
    """PreAct-ResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, mean, std, widths)


@register_model("wrn-28-4")
def wrn_28_4(
    *, num_classes: int, in_channels: int, input_size: int, mean, std, widths=None
) -> nn.Module:
    """Wide ResNet 28-4."""
    return WideResNet(28, 4, num_classes, in_channels, mean, std, widths)
