"""MobileNetV2 (Sandler et al. 2018): adapted to 32x32 inputs (stride-1 stem, as in CIFAR ports), and
torchvision's layout (``mobilenet-v2-torchvision``, what BackdoorBench trains on 32x32 images).

The CIFAR port (``mobilenet-v2``) expands with a 1x1 conv in every block and adds a 1x1 conv + BN
shortcut where a stride-1 block changes the width. torchvision's has a stride-2 stem and the
paper's strides, no expansion conv in the first block (expansion 1), and a residual only where
a block keeps its shape (no shortcut convs); its classifier's dropout is not modelled (eval is
the same; bdjax trains it without dropout).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.base import ConvUnit, Normalize, batch_norm, conv

# (expansion, out_channels, num_blocks, first_stride); first two strides 1 for 32x32 inputs.
CIFAR_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# The paper's table 2 (torchvision's inverted_residual_setting).
PAPER_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expansion (conv1), 3x3 depthwise (conv2), 1x1 projection (conv3), each with its BN.

    ``torchvision``: no conv1 when ``expansion == 1`` and a residual only where the shape is
    kept; otherwise every stride-1 block is residual, through a 1x1 conv + BN if the width changes.
    """

    expansion: int
    features: int
    strides: int
    torchvision: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = self.expansion * x.shape[-1]
        y = x
        if not (self.torchvision and self.expansion == 1):
            y = nn.relu6(batch_norm(train, "bn1")(conv(hidden, 1, 1, "conv1")(x)))
        y = nn.relu6(batch_norm(train, "bn2")(conv(hidden, 3, self.strides, "conv2", groups=hidden)(y)))
        y = batch_norm(train, "bn3")(conv(self.features, 1, 1, "conv3")(y))
        if self.strides == 1:
            if x.shape[-1] != self.features:
                if self.torchvision:
                    return y
                x = batch_norm(train, "shortcut_bn")(conv(self.features, 1, 1, "shortcut_conv")(x))
            y = y + x
        return y


class MobileNetV2(nn.Module):
    num_classes: int
    config: Sequence = CIFAR_CONFIG
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) it takes; None: any H, W
    stem_stride: int = 1
    torchvision: bool = False  # torchvision's blocks (see InvertedResidual)

    def _blocks(self):
        blocks, in_width = [], 32
        for stage, (expansion, width, count, first_stride) in enumerate(self.config):
            for index in range(count):
                stride = first_stride if index == 0 else 1
                blocks.append((f"block{stage}_{index}", expansion, width, stride,
                               stride == 1 and in_width != width and not self.torchvision))
                in_width = width
        return blocks

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = Normalize(self.mean, self.std, self.image_shape)(images)
        x = nn.relu6(batch_norm(train, "bn")(conv(32, 3, self.stem_stride, "conv")(x)))
        for name, expansion, width, stride, _ in self._blocks():
            x = InvertedResidual(expansion, width, stride, self.torchvision, name=name)(x, train)
        x = nn.relu6(batch_norm(train, "head_bn")(conv(1280, 1, 1, "head_conv")(x)))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def conv_units(self) -> tuple[ConvUnit, ...]:
        units = (ConvUnit(("conv",), ("bn",)),)
        for name, expansion, _, _, projection in self._blocks():
            first = 2 if self.torchvision and expansion == 1 else 1
            units += tuple(ConvUnit((name, f"conv{i}"), (name, f"bn{i}")) for i in range(first, 4))
            if projection:
                units += (ConvUnit((name, "shortcut_conv"), (name, "shortcut_bn"), shortcut=True),)
        return units + (ConvUnit(("head_conv",), ("head_bn",)),)


def mobilenet_v2(num_classes: int, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes, **kwargs)


def mobilenet_v2_torchvision(num_classes: int, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes, PAPER_CONFIG, stem_stride=2, torchvision=True, **kwargs)
