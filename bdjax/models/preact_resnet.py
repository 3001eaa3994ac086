"""Pre-activation ResNet-18 (He et al. 2016b) with a CIFAR stem, BackdoorBench's default model.

``final_bn``: the BN-ReLU of the pre-activation design before pooling (``preact-resnet18``).
BackdoorBench's PreActResNet18 pools the last block's sum directly
(``preact-resnet18-backdoorbench``, what ``bdjax import-torch`` reads its checkpoints into).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.base import ConvUnit, Normalize, batch_norm, conv, residual_stages


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut (1x1 conv on the pre-activated input)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(batch_norm(train, "bn1")(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, "shortcut_conv")(out)
        else:
            shortcut = x
        y = conv(self.features, 3, self.strides, "conv1")(out)
        y = conv(self.features, 3, 1, "conv2")(nn.relu(batch_norm(train, "bn2")(y)))
        return y + shortcut

    @staticmethod
    def units(prefix: str, has_projection: bool) -> tuple[ConvUnit, ...]:
        # Only conv1 feeds a BatchNorm directly (bn2). conv2 and the shortcut are summed
        # before the next block's bn1, so no single BN normalises either of them.
        units = (ConvUnit((prefix, "conv1"), (prefix, "bn2")), ConvUnit((prefix, "conv2")))
        if has_projection:
            units += (ConvUnit((prefix, "shortcut_conv"), shortcut=True),)
        return units


class PreActResNet(nn.Module):
    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) it takes; None: any H, W
    final_bn: bool = True

    def _blocks(self):
        return residual_stages(self.stage_sizes, self.widths)

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = Normalize(self.mean, self.std, self.image_shape)(images)
        x = conv(self.widths[0], 3, 1, "conv")(x)
        for name, width, stride, _ in self._blocks():
            x = PreActBlock(width, stride, name=name)(x, train)
        if self.final_bn:  # the pre-activation design's last BN-ReLU, before pooling
            x = nn.relu(batch_norm(train, "bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def conv_units(self) -> tuple[ConvUnit, ...]:
        units = (ConvUnit(("conv",)),)
        for name, _, _, projection in self._blocks():
            units += PreActBlock.units(name, projection)
        return units

    def gradcam_layer(self) -> tuple[str, ...]:
        """The last block's output (after the shortcut sum), as ResNet.gradcam_layer."""
        return (self._blocks()[-1][0],)


def preact_resnet18(num_classes: int, **kwargs) -> PreActResNet:
    return PreActResNet(num_classes, **kwargs)
