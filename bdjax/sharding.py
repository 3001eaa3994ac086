"""Spread a vmapped sweep axis over every available device.

A sweep stacks N settings (seeds, thresholds, learning rates, ...) along a leading axis and
runs them as one vmapped program. Placing that axis on a one-dimensional ``Mesh`` with a
``NamedSharding`` makes XLA split the program across devices (1 CPU, 8 GPUs or a TPU slice)
with no change to the program itself: computation follows the data's sharding.

N must divide evenly over the devices, so sweeps pad the axis (repeating the last setting)
and drop the padding afterwards: ``padded_size`` / ``pad_leading`` / ``unpad_leading``.

Multi-host: call ``jax.distributed.initialize()`` in every process before anything else
(see the README); ``jax.devices()`` then lists every host's devices and ``sweep_mesh()``
spans them all. Host-local arrays must then be assembled with
``jax.make_array_from_process_local_data`` instead of ``shard_leading``'s ``device_put``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "sweep"


def sweep_mesh(devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh named ``"sweep"`` over ``devices`` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("a sweep mesh needs at least one device")
    return Mesh(np.asarray(devices), (AXIS,))


def padded_size(n: int, mesh: Mesh | None) -> int:
    """Smallest multiple of the mesh size that is >= n (n itself without a mesh)."""
    if mesh is None:
        return n
    return math.ceil(n / mesh.size) * mesh.size


def pad_leading(tree, size: int):
    """Repeat the last entry of every leaf's leading axis until it has ``size`` entries."""
    def pad(x):
        x = jnp.asarray(x)
        extra = size - x.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad a leading axis of {x.shape[0]} down to {size}")
        if extra == 0:
            return x
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])
    return jax.tree_util.tree_map(pad, tree)


def unpad_leading(tree, n: int):
    return jax.tree_util.tree_map(lambda x: x[:n], tree)


def shard_leading(tree, mesh: Mesh | None):
    """Place every leaf with its leading axis split over ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.device_put(tree, sharding)
