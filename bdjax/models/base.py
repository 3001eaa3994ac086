"""What every bdjax architecture declares, and the small pieces they share.

A model is ``(module, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
(``batch_stats`` absent for models without BatchNorm). Modules take float32 images in
[0, 1] (``[N, H, W, C]``) and a ``train`` flag, and return logits ``[N, num_classes]``.

Each architecture lists its convolutions as ``ConvUnit``s: the path of the conv in
``params``, the path of the BatchNorm that normalises that conv's output (or ``None``),
and whether it is a shortcut (projection) conv. Defenses never guess the conv -> BN
pairing from registration order (the bug that breaks CLP on pre-activation ResNets).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ConvUnit:
    """One convolution and the BatchNorm applied directly to its output.

    The unit's *output* (what defenses read, perturb and score per channel) is the BN
    output when ``bn`` is set, else the conv output; either way before the nonlinearity.
    """

    conv: Path
    bn: Path | None = None
    shortcut: bool = False

    @property
    def name(self) -> str:
        return "/".join(self.conv)

    @property
    def output(self) -> Path:
        """Path of the module whose output is this unit's output."""
        return self.bn if self.bn is not None else self.conv


# BatchNorm as in PyTorch (momentum 0.1 there == 0.9 here, eps 1e-5), so numbers compare.
# Known differences, kept on purpose (trained zoo models depend on them): the running variance
# averages the biased batch variance (PyTorch's the unbiased one, larger by n / (n - 1)), and
# train-mode variance is Flax's fast E[x²] − (E x)² (PyTorch's is two-pass; ANP, whose masks
# are learned in train mode, switches to two-pass: ``anp.two_pass_batch_norm``). Eval-mode
# inference uses the running statistics and is unaffected by the second.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, name=name)


class Normalize(nn.Module):
    """(x - mean) / std with the dataset's channel statistics; no parameters.

    Checks the input's shape where it is static (also under ``jit``): C must be the number of
    channel statistics (a grey image would silently broadcast against RGB ones), and H, W those
    of ``image_shape`` when the model was built for a dataset (``bdjax.models.create``).
    """

    mean: Sequence[float]
    std: Sequence[float]
    image_shape: Sequence[int] | None = None

    def __call__(self, images):
        if images.ndim != 4:
            raise ValueError(f"images must be float[N, H, W, C], got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(
                f"models take float pixels in [0, 1], got {images.dtype}; use bdjax.data.to_float")
        expected = tuple(self.image_shape) if self.image_shape is not None else (None, None, len(self.mean))
        if any(want is not None and want != got for want, got in zip(expected, images.shape[1:])):
            shown = "x".join("?" if d is None else str(d) for d in expected)
            raise ValueError(f"images are {'x'.join(map(str, images.shape[1:]))} (H x W x C) per image but "
                             f"this model takes {shown}")
        # Explicit [1, 1, 1, C] statistics: no implicit rank promotion (tests make it an error).
        mean = jnp.asarray(self.mean, images.dtype).reshape(1, 1, 1, -1)
        std = jnp.asarray(self.std, images.dtype).reshape(1, 1, 1, -1)
        return (images - mean) / std


def conv_kernel_init():
    # He (fan-out) normal, as torchvision/BackdoorBench initialise their convs.
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, strides: int, name: str, groups: int = 1) -> nn.Conv:
    """Bias-free 'same' conv as used before a BatchNorm in the ResNet family."""
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=kernel // 2,
                   feature_group_count=groups, use_bias=False, kernel_init=conv_kernel_init(),
                   name=name)


def residual_stages(stage_sizes: Sequence[int], widths: Sequence[int]):
    """(block name, width, stride, changes_shape) for every block of a ResNet-style network:
    the first block of every stage after the first halves the resolution."""
    blocks, in_width = [], widths[0]
    for stage, (count, width) in enumerate(zip(stage_sizes, widths)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append((f"stage{stage + 1}_{index}", width, stride, stride != 1 or in_width != width))
            in_width = width
    return blocks
