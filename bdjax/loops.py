"""Optimisation loops whose steps differentiate through a network, compiled once per step.

``scan`` keeps ``jax.lax.scan``'s contract and chooses how to run by backend:

- **host** (the default on CPU): ``step`` compiled once and called from Python. XLA:CPU runs
  a convolution's backward pass several times slower inside a while loop (a ``lax.scan`` or
  ``fori_loop``) than in a program of its own (jax-ml/jax#12868): on the 2-core CI machine a
  ResNet-20 trigger-search step of 90 CIFAR-10 images took 2.6 s inside a scan and 0.4 s
  alone, and a step with weight gradients 40 s against 2.8 s (5-14x). The host loop costs a
  few microseconds of dispatch per step.
- **scan** (the default on accelerators, ``jax.default_backend() != "cpu"``): the whole loop
  as one compiled ``jax.lax.scan``, so no step waits for Python.

``loop="host" | "scan" | "auto"`` or the environment variable ``BDJAX_LOOP`` overrides it.

Compiled loops are cached: a step that is a module-level function, or a
``functools.partial`` of one whose bound arguments are hashable (its configuration: a
frozen config, a module, layer names), is compiled once per shape, so repeated calls,
sweeps and tests pay compilation once. Data a step reads but does not carry (images,
labels, a teacher's weights) come in ``consts``: ``step(consts, carry, x)``. A closure
(a function defined inside another) is compiled on every call, as it may hide data.

Loops of a few fixed steps inside a step are better unrolled (``jax.lax.scan(...,
unroll=True)``), which leaves no while loop. The CPU slowdown depends on the shapes: TAC's
stage 1 (the layers after an 8x8x128 unit, differentiated w.r.t. a map added to it) ran twice
as fast inside its ``lax.scan`` as in a host loop, and keeps it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from bdjax import progress

LOOPS = ("host", "scan", "auto")


def loop_kind(loop: str | None = None, backend: str | None = None) -> str:
    """"host" or "scan": ``loop``, else ``$BDJAX_LOOP``, else "auto" -- "scan" on an
    accelerator, "host" on CPU (``backend``: default ``jax.default_backend()``)."""
    choice = loop or os.environ.get("BDJAX_LOOP") or "auto"
    if choice not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {choice!r} (argument or BDJAX_LOOP)")
    if choice != "auto":
        return choice
    return "host" if (backend or jax.default_backend()) == "cpu" else "scan"


def _traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def cache_key(step):
    """A hashable key for what ``step`` computes, or None when it cannot be cached: a
    function defined inside another, or a partial binding unhashable values (arrays)."""
    if isinstance(step, functools.partial):
        inner = cache_key(step.func)
        key = None if inner is None else (inner, step.args, tuple(sorted(step.keywords.items())))
    else:
        local = "<locals>" in getattr(step, "__qualname__", "<locals>")
        key = None if local or getattr(step, "__closure__", None) else step
    try:
        hash(key)
    except TypeError:
        return None
    return key


# (cache_key(step), kind, with consts) -> the jitted step or loop. Entries live as long as
# the process: one per step function and configuration, each holding its compiled shapes.
_COMPILED: dict = {}


def compiled(step, kind: str, with_consts: bool):
    """The jitted ``step`` (kind "host") or whole ``lax.scan`` loop (kind "scan"), cached
    when ``cache_key(step)`` is not None. The loop is called as ``loop(consts, carry, xs, length)``."""
    key = cache_key(step)
    if key is not None and (key, kind, with_consts) in _COMPILED:
        return _COMPILED[key, kind, with_consts]
    if kind == "host":
        function = jax.jit(step)
    else:
        def whole(consts, carry, xs, length):
            body = functools.partial(step, consts) if with_consts else step
            return jax.lax.scan(body, carry, xs, length=length)
        function = jax.jit(whole, static_argnames="length")
    if key is not None:
        _COMPILED[key, kind, with_consts] = function
    return function


def scan(step, carry, xs=None, length: int | None = None, *, consts=None, loop: str | None = None):
    """``jax.lax.scan(step, carry, xs, length)``, compiled once per step and shape.

    ``step(carry, x) -> (carry, y)``, or ``step(consts, carry, x)`` when ``consts`` (a
    pytree of arrays every step reads) is given. Returns ``(carry, ys)`` with ``ys`` stacked
    along a new leading axis. ``loop``: "host", "scan" or "auto" (see the module docstring).
    Inside a trace (``carry``, ``xs`` or ``consts`` hold tracers, e.g. under ``jit`` or
    ``vmap``) it is ``jax.lax.scan`` itself, so the caller stays traceable.
    """
    body = step if consts is None else functools.partial(step, consts)
    if _traced((carry, xs, consts)):
        return jax.lax.scan(body, carry, xs, length=length)
    leaves = jax.tree_util.tree_leaves(xs)
    count = length if not leaves else leaves[0].shape[0]
    if count is None:
        raise ValueError("scan needs xs or a length")
    if leaves and length is not None and length != count:
        raise ValueError(f"length {length} does not match xs' leading axis {count}")
    kind = loop_kind(loop)
    run = compiled(step, kind, consts is not None)
    # Named after the step's module and function, e.g. "anp: iteration 120/2000, 31 s, ETA 486 s".
    named = step.func if isinstance(step, functools.partial) else step
    where = getattr(named, "__module__", "").rsplit(".", 1)[-1]
    steps = progress.Steps(f"{where}: {getattr(named, '__name__', 'step')}", count)
    if kind == "scan":
        carry, ys = run(consts, carry, xs, count)
        if progress.shown():
            jax.block_until_ready(carry)
        steps.done(count)
        return carry, ys
    call = run if consts is None else functools.partial(run, consts)
    wait = progress.shown()  # else JAX dispatches every step at once and the times say nothing
    ys = []
    for i in range(count):
        carry, y = call(carry, None if xs is None else jax.tree_util.tree_map(lambda x: x[i], xs))
        ys.append(y)
        if wait:
            jax.block_until_ready(carry)
        steps.done()
    if ys:
        return carry, jax.tree_util.tree_map(lambda *y: jnp.stack(y), *ys)
    one = None if xs is None else jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    shapes = jax.eval_shape(body, carry, one)[1]
    return carry, jax.tree_util.tree_map(lambda s: jnp.zeros((0, *s.shape), s.dtype), shapes)
