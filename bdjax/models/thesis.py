"""The Small / Medium / Large networks of Dhonthi et al., used in the TAC-pruning thesis.

The thesis (table 5.1) gives only the conv count, total feature maps and parameter count
(GTSRB, 43 classes). The layouts below are the ones that reproduce those numbers exactly:
5x5 convs with bias, ReLU, 2x2 max-pools, one linear layer:

| model  | channels              | padding | pool after | params (BN) |
|--------|-----------------------|---------|------------|-------------|
| Small  | 8, 16, 32, 16         | valid   | 1, 4       | 30 203 (30 347) |
| Medium | 16, 32, 64, 32, 16    | same    | every conv | 130 091 (130 411) |
| Large  | 32, 64, 128, 64, 32   | same    | every conv | 516 139 (516 779) |

The -BN variants put a BatchNorm after every conv (before the ReLU), as in the thesis.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from bdjax.models.base import ConvUnit, Normalize, batch_norm

LAYOUTS = {
    "small": dict(widths=(8, 16, 32, 16), padding="VALID", pool_after=(0, 3)),
    "medium": dict(widths=(16, 32, 64, 32, 16), padding="SAME", pool_after=(0, 1, 2, 3, 4)),
    "large": dict(widths=(32, 64, 128, 64, 32), padding="SAME", pool_after=(0, 1, 2, 3, 4)),
}


class ConvPoolNet(nn.Module):
    num_classes: int
    widths: Sequence[int]
    padding: str
    pool_after: Sequence[int]
    use_bn: bool = False
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) it takes; None: any H, W

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = Normalize(self.mean, self.std, self.image_shape)(images)
        for index, width in enumerate(self.widths):
            x = nn.Conv(width, (5, 5), padding=self.padding, name=f"conv{index}")(x)
            if self.use_bn:
                x = batch_norm(train, f"bn{index}")(x)
            x = nn.relu(x)
            if index in self.pool_after:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def conv_units(self) -> tuple[ConvUnit, ...]:
        return tuple(ConvUnit((f"conv{i}",), (f"bn{i}",) if self.use_bn else None)
                     for i in range(len(self.widths)))


def conv_pool_net(size: str, num_classes: int, use_bn: bool = False, **kwargs) -> ConvPoolNet:
    if size not in LAYOUTS:
        raise ValueError(f"size must be one of {sorted(LAYOUTS)}, got {size!r}")
    return ConvPoolNet(num_classes, use_bn=use_bn, **LAYOUTS[size], **kwargs)
