"""ResNets with a CIFAR stem: ResNet-20/32/56 (He et al. 2016, sec. 4.2) and ResNet-18."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.base import ConvUnit, Normalize, batch_norm, conv, residual_stages


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU.

    ``shortcut="projection"``: 1x1 conv + BN when the shape changes (ResNet-18, option B);
    ``shortcut="pad"``: strided identity with zero-padded channels (CIFAR ResNet-20, option A,
    parameter-free, as in the original paper and the common PyTorch ports).
    """

    features: int
    strides: int = 1
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x, train: bool):
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = batch_norm(train, "bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "projection":
                x = conv(self.features, 1, self.strides, "shortcut_conv")(x)
                x = batch_norm(train, "shortcut_bn")(x)
            else:
                x = x[:, ::self.strides, ::self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + x)

    @staticmethod
    def units(prefix: str, has_projection: bool) -> tuple[ConvUnit, ...]:
        units = (ConvUnit((prefix, "conv1"), (prefix, "bn1")),
                 ConvUnit((prefix, "conv2"), (prefix, "bn2")))
        if has_projection:
            units += (ConvUnit((prefix, "shortcut_conv"), (prefix, "shortcut_bn"), shortcut=True),)
        return units


class ResNet(nn.Module):
    """CIFAR-stem ResNet: conv3x3 stem (no max-pool), stages of BasicBlocks, global pooling."""

    num_classes: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    shortcut: str
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) it takes; None: any H, W

    def _blocks(self):
        """(name, width, stride, has_projection) for every block, in order."""
        return [(name, width, stride, self.shortcut == "projection" and changes_shape)
                for name, width, stride, changes_shape in residual_stages(self.stage_sizes, self.widths)]

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = Normalize(self.mean, self.std, self.image_shape)(images)
        x = conv(self.widths[0], 3, 1, "conv")(x)
        x = nn.relu(batch_norm(train, "bn")(x))
        for name, width, stride, _ in self._blocks():
            x = BasicBlock(width, stride, self.shortcut, name=name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def conv_units(self) -> tuple[ConvUnit, ...]:
        units = (ConvUnit(("conv",), ("bn",)),)
        for name, _, _, projection in self._blocks():
            units += BasicBlock.units(name, projection)
        return units

    def gradcam_layer(self) -> tuple[str, ...]:
        """The last block's output (after the shortcut sum and ReLU): Grad-CAM's usual ResNet
        layer (``model.layer4[-1]`` in pytorch-grad-cam), not the residual branch alone."""
        return (self._blocks()[-1][0],)


def resnet_cifar(depth: int, num_classes: int, **kwargs) -> ResNet:
    """ResNet-{20,32,56,...}: depth = 6n + 2, widths 16/32/64, parameter-free shortcuts."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(num_classes, (n, n, n), (16, 32, 64), "pad", **kwargs)


def resnet18(num_classes: int, **kwargs) -> ResNet:
    """ResNet-18 with a CIFAR stem (3x3 conv, no max-pool) and projection shortcuts."""
    return ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), "projection", **kwargs)
