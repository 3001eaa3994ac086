"""Optimisation loops whose steps differentiate through a network: a host loop of one jitted step.

XLA:CPU runs a convolution's backward pass several times slower inside a while loop (a
``lax.scan`` or ``fori_loop``) than in a program of its own (jax-ml/jax#12868): on the 2-core
CI machine a ResNet-20 trigger-search step of 90 CIFAR-10 images took 2.6 s inside a scan and
0.4 s alone, and a step with weight gradients 40 s against 2.8 s. ``scan`` here keeps
``jax.lax.scan``'s contract but compiles ``step`` once and calls it from Python, which costs
a few microseconds of dispatch per step on any backend. Loops of a few fixed steps inside a
step are better unrolled (``jax.lax.scan(..., unroll=True)``), which leaves no while loop.
The slowdown depends on the shapes, so measure before moving a loop: TAC's stage 1 (the
layers after an 8x8x128 unit, differentiated w.r.t. a map added to it) ran twice as fast
inside its ``lax.scan`` as in a host loop, and keeps it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bdjax import progress


def _traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def scan(step, carry, xs=None, length: int | None = None):
    """``jax.lax.scan(step, carry, xs, length)``, the loop on the host and ``step`` jitted.

    Returns ``(carry, ys)`` with ``ys`` stacked along a new leading axis, as ``lax.scan`` does.
    Inside a trace (``carry`` or ``xs`` hold tracers, e.g. under ``jit`` or ``vmap``) it is
    ``jax.lax.scan`` itself, so the caller stays traceable.
    """
    if _traced((carry, xs)):
        return jax.lax.scan(step, carry, xs, length=length)
    leaves = jax.tree_util.tree_leaves(xs)
    count = length if not leaves else leaves[0].shape[0]
    if count is None:
        raise ValueError("scan needs xs or a length")
    if leaves and length is not None and length != count:
        raise ValueError(f"length {length} does not match xs' leading axis {count}")
    compiled = jax.jit(step)
    # Named after the step's module and function, e.g. "anp: iteration 120/2000, 31 s, ETA 486 s".
    where = getattr(step, "__module__", "").rsplit(".", 1)[-1]
    steps = progress.Steps(f"{where}: {getattr(step, '__name__', 'step')}", count)
    wait = progress.shown()  # else JAX dispatches every step at once and the times say nothing
    ys = []
    for i in range(count):
        carry, y = compiled(carry, None if xs is None else jax.tree_util.tree_map(lambda x: x[i], xs))
        ys.append(y)
        if wait:
            jax.block_until_ready(carry)
        steps.done()
    if ys:
        return carry, jax.tree_util.tree_map(lambda *y: jnp.stack(y), *ys)
    one = None if xs is None else jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    shapes = jax.eval_shape(step, carry, one)[1]
    return carry, jax.tree_util.tree_map(lambda s: jnp.zeros((0, *s.shape), s.dtype), shapes)
