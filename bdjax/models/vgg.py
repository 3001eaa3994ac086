"""VGG with BatchNorm for 32x32 inputs (conv-BN-ReLU stacks, max-pool, linear classifier)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from bdjax.models.base import ConvUnit, Normalize, batch_norm, conv_kernel_init

# Simonyan & Zisserman configurations A (11) and D (16); "M" is a 2x2 max-pool.
CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    num_classes: int
    config: Sequence = CONFIGS[11]
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) it takes; None: any H, W

    def _convs(self):
        return [width for width in self.config if width != "M"]

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = Normalize(self.mean, self.std, self.image_shape)(images)
        index = 0
        for width in self.config:
            if width == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.Conv(width, (3, 3), padding=1, kernel_init=conv_kernel_init(), name=f"conv{index}")(x)
            x = nn.relu(batch_norm(train, f"bn{index}")(x))
            index += 1
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def conv_units(self) -> tuple[ConvUnit, ...]:
        return tuple(ConvUnit((f"conv{i}",), (f"bn{i}",)) for i in range(len(self._convs())))


def vgg_bn(depth: int, num_classes: int, **kwargs) -> VGG:
    if depth not in CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    return VGG(num_classes, CONFIGS[depth], **kwargs)
