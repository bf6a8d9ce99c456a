"""Built-in architectures the CLI can train from scratch, registered by name.

Each factory takes ``input_shape`` (without the batch dimension) and ``num_classes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

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


def build(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a registered architecture by name."""
    return ARCHITECTURES.get(name)(input_shape=tuple(input_shape), num_classes=num_classes)
