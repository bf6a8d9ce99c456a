"""Built-in architectures the CLI can train from scratch, registered by name.

Each factory takes ``input_shape`` (without the batch dimension) and ``num_classes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from modelshield.core.errors import InvalidConfigError
from modelshield.core.registry import Registry

ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("architectures")


@ARCHITECTURES.register("mlp")
def mlp(
    input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)
) -> nn.Module:
    """Multi-layer perceptron with ReLU on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@ARCHITECTURES.register("small_cnn")
def small_cnn(input_shape: Sequence[int], num_classes: int, width: int = 32) -> nn.Module:
    """Two 3×3 conv blocks (the second strided), global average pooling, a linear head."""
    if len(input_shape) != 3:
        raise InvalidConfigError(
            f"small_cnn needs image inputs (C, H, W), got input_shape={tuple(input_shape)}"
        )
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@ARCHITECTURES.register("cnn")
def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The default image CNN: :func:`small_cnn` (no BatchNorm, so DP-SGD needs no fixes)."""
    return small_cnn(input_shape, num_classes)


def build(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a registered architecture by name."""
    return ARCHITECTURES.get(name)(input_shape=tuple(input_shape), num_classes=num_classes)


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016): a 3×3 stem without max-pooling, BasicBlocks
    [2, 2, 2, 2] of widths w, 2w, 4w, 8w (strides 1, 2, 2, 2), global average pooling and a
    linear head — the network of Madry et al.'s and Rice et al.'s CIFAR-10 experiments
    (``width=64``). Works for any ``(C, H, W)`` input: the pooling absorbs the spatial size.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            blocks += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@ARCHITECTURES.register("resnet18")
def resnet18(input_shape: Sequence[int], num_classes: int, width: int = 64) -> nn.Module:
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool, BasicBlock [2, 2, 2, 2])."""
    if len(input_shape) != 3:
        raise InvalidConfigError(
            f"resnet18 needs image inputs (C, H, W), got input_shape={tuple(input_shape)}"
        )
    if isinstance(num_classes, bool) or int(num_classes) < 2:
        raise InvalidConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(width, bool) or int(width) < 1:
        raise InvalidConfigError(f"width must be an integer >= 1, got {width!r}")
    return ResNet18(int(input_shape[0]), int(num_classes), int(width))
