"""bdjax.loops.scan keeps lax.scan's contract with the loop on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import loops


def _step(carry, x):
    total, count = carry
    return (total + x["a"] * x["b"], count + 1), {"seen": x["a"], "running": total}


def test_scan_matches_lax_scan_on_pytrees_and_key_arrays():
    xs = {"a": jnp.arange(5.0), "b": jnp.linspace(1.0, 2.0, 5)}
    start = (jnp.float32(0.0), jnp.int32(0))
    ours, ys = loops.scan(_step, start, xs)
    ref, ref_ys = jax.lax.scan(_step, start, xs)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    assert int(ours[1]) == 5
    for name in ("seen", "running"):
        np.testing.assert_allclose(ys[name], ref_ys[name], rtol=1e-6)

    keys = jax.random.split(jax.random.key(0), 3)
    draw = lambda c, k: (c + jax.random.uniform(k), jax.random.uniform(k))  # noqa: E731
    np.testing.assert_allclose(loops.scan(draw, 0.0, keys)[1], jax.lax.scan(draw, 0.0, keys)[1], rtol=1e-6)


def test_scan_with_a_length_and_with_no_steps():
    carry, ys = loops.scan(lambda c, _: (c * 2.0, c), jnp.float32(1.0), length=4)
    assert float(carry) == 16.0
    np.testing.assert_array_equal(ys, [1.0, 2.0, 4.0, 8.0])
    empty = {"a": jnp.zeros((0,)), "b": jnp.zeros((0,))}
    carry, ys = loops.scan(_step, (jnp.float32(3.0), jnp.int32(0)), empty)
    assert float(carry[0]) == 3.0 and ys["seen"].shape == (0,) and ys["running"].dtype == jnp.float32


def test_scan_inside_a_trace_is_lax_scan():
    xs = {"a": jnp.arange(3.0), "b": jnp.ones(3)}
    traced = jax.jit(lambda c: loops.scan(_step, (c, jnp.int32(0)), xs)[0][0])
    assert float(traced(jnp.float32(1.0))) == 4.0
    batched = jax.vmap(lambda c: loops.scan(_step, (c, jnp.int32(0)), xs)[0][0])(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(batched, [3.0, 4.0])


def test_scan_rejects_a_missing_or_wrong_length():
    with pytest.raises(ValueError, match="xs or a length"):
        loops.scan(_step, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        loops.scan(_step, (0.0, 0), {"a": jnp.ones(3), "b": jnp.ones(3)}, length=2)
