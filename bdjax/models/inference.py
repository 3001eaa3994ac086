"""Batched, jitted forward passes in evaluation mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.dataset import check_pixel_range, to_float


@functools.partial(jax.jit, static_argnums=0)
def logits_fn(module, variables, images):
    """Eval-mode logits. images: f32[N, H, W, C] in [0, 1] -> f32[N, num_classes]."""
    return module.apply(variables, images, train=False)


def padded_batches(images, batch_size: int):
    """Yield ``(chunk, count)``: f32 chunks of exactly min(batch_size, N) images and how many are real.

    The last chunk is padded with zeros, so a jitted function sees one shape (one compilation);
    keep the first ``count`` outputs. images: uint8 stored pixels or floats in [0, 1], N > 0.
    """
    images = np.asarray(images)
    size = min(batch_size, images.shape[0])
    for start in range(0, images.shape[0], size):
        chunk = images[start:start + size]
        chunk = to_float(chunk) if chunk.dtype == np.uint8 else chunk
        count = chunk.shape[0]
        if count < size:
            chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), chunk.dtype)])
        yield jnp.asarray(chunk), count


def check_inputs(module, images, what: str = "images") -> np.ndarray:
    """``images`` as an array if the model ``module`` can take them, else an error naming ``what``.

    uint8 stored pixels, or floats that are finite and in [0, 1] (not 0..255, not [-1, 1]);
    [N, H, W, C] with the model's H, W, C (``module.image_shape``; C also from its channel
    statistics). A batch that breaks any of these would otherwise be classified silently wrong.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{what} must be uint8 stored pixels or floats in [0, 1], got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{what} must be [N, H, W, C], got shape {images.shape}")
    expected = getattr(module, "image_shape", None)
    channels = len(module.mean) if hasattr(module, "mean") else None
    if expected is not None and tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(f"{what} are {'x'.join(map(str, images.shape[1:]))} (H x W x C) per image but "
                         f"the model takes {'x'.join(map(str, expected))}")
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(f"{what} have {images.shape[-1]} channel(s) but the model takes {channels}")
    if images.dtype != np.uint8:
        check_pixel_range(images, what)
    return images


def check_finite_variables(variables, what: str = "model variables"):
    """Raise FloatingPointError naming the first leaf of ``variables`` that holds NaN or inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise FloatingPointError(f"{what} hold NaN or inf values (first in {name}): the training or "
                                     "repair that produced them diverged")


def batched_logits(module, variables, images, batch_size: int = 500) -> np.ndarray:
    """Logits for many images (uint8 stored pixels or floats in [0, 1]), in fixed-size batches.

    The images are checked first (``check_inputs``)."""
    images = check_inputs(module, images)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if images.shape[0] == 0:
        shape = jax.eval_shape(lambda x: module.apply(variables, x, train=False),
                               jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
        return np.zeros((0, shape.shape[-1]), np.float32)
    return np.concatenate([np.asarray(logits_fn(module, variables, chunk))[:count]
                           for chunk, count in padded_batches(images, batch_size)])


def predict(module, variables, images, batch_size: int = 500) -> np.ndarray:
    """int32[N] predicted classes."""
    return batched_logits(module, variables, images, batch_size).argmax(-1).astype(np.int32)
