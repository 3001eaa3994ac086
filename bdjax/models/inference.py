"""Batched, jitted forward passes in evaluation mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.dataset import to_float


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


def batched_logits(module, variables, images, batch_size: int = 500) -> np.ndarray:
    """Logits for many images (uint8 stored pixels or floats in [0, 1]), in fixed-size batches."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    if images.shape[0] == 0:
        shape = jax.eval_shape(lambda x: module.apply(variables, x, train=False),
                               jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
        return np.zeros((0, shape.shape[-1]), np.float32)
    return np.concatenate([np.asarray(logits_fn(module, variables, chunk))[:count]
                           for chunk, count in padded_batches(images, batch_size)])


def predict(module, variables, images, batch_size: int = 500) -> np.ndarray:
    """int32[N] predicted classes."""
    return batched_logits(module, variables, images, batch_size).argmax(-1).astype(np.int32)
