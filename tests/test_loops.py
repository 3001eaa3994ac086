"""bdjax.loops.scan keeps lax.scan's contract, as a host loop or one compiled scan, compiles a
step once per configuration and shape, and chooses by backend (as sweeps do)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import loops, sweep
from bdjax.data.dataset import Dataset
from bdjax.defenses import anp, ibau

from conftest import SYNTHETIC_INFO, random_uint8


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


# --------------------------------------------------------------------------- compile once
TRACES = []


def _scaled_sum(data, carry, x, *, scale):
    TRACES.append(scale)  # runs once per trace, not per call
    weights, bias = data
    return carry + scale * jnp.sum(weights * x) + bias, carry


@pytest.mark.parametrize("loop", ["host", "scan"])
def test_a_module_level_step_compiles_once_per_configuration_and_shape(loop):
    TRACES.clear()
    xs = jnp.arange(12.0).reshape(4, 3)
    for weights in (jnp.ones(3), jnp.full(3, 2.0, jnp.float32)):  # new data, same shapes: no new trace
        step = functools.partial(_scaled_sum, scale=0.5)
        carry, ys = loops.scan(step, jnp.float32(0.0), xs, consts=(weights, jnp.float32(1.0)), loop=loop)
        running = np.cumsum(0.5 * np.asarray(xs) @ np.asarray(weights) + 1.0)
        np.testing.assert_allclose(carry, running[-1], rtol=1e-6)
        np.testing.assert_allclose(ys, np.concatenate([[0.0], running[:-1]]), rtol=1e-6)
    assert TRACES == [0.5]
    loops.scan(functools.partial(_scaled_sum, scale=2.0), jnp.float32(0.0), xs, consts=(weights, 1.0), loop=loop)
    loops.scan(functools.partial(_scaled_sum, scale=2.0), jnp.float32(0.0), xs[:2], consts=(weights, 1.0), loop=loop)
    # A new configuration traces again; a new length only where the whole loop is compiled.
    assert TRACES == [0.5, 2.0] + ([2.0] if loop == "scan" else [])


def test_closures_and_partials_of_arrays_are_not_cached():
    def local(carry, x):
        return carry, x
    assert loops.cache_key(local) is None
    assert loops.cache_key(functools.partial(_scaled_sum, scale=jnp.ones(2))) is None
    assert loops.cache_key(functools.partial(_scaled_sum, scale=1.0)) is not None
    assert loops.cache_key(_step) is _step


def test_a_second_anp_or_ibau_call_on_new_data_does_not_recompile(tiny_model):
    module, variables = tiny_model("small-bn")
    config = anp.AnpConfig(iterations=2, threshold=0.2)
    for seed in (0, 1):
        clean = Dataset(random_uint8(8, seed=seed), np.arange(8) % 4, SYNTHETIC_INFO)
        anp.anp(module, variables, clean, jax.random.key(seed), config)
    units = anp.bn_units_or_raise(module, variables, "ANP")
    iteration = functools.partial(anp.mask_iteration, module=module, units=units, config=config, flip=False)
    assert loops.compiled(iteration, "host", True)._cache_size() == 1

    ibau_config = ibau.IBAUConfig(rounds=2, batch_size=4)
    for seed in (0, 1):  # two calls of two rounds: one compilation of each step
        clean = Dataset(random_uint8(8, seed=seed), np.arange(8) % 4, SYNTHETIC_INFO)
        ibau.ibau(module, variables, clean, jax.random.key(seed), ibau_config)
    unlearn = functools.partial(ibau.unlearn, module=module, config=ibau_config, count=1)
    ascend = functools.partial(ibau.ascend, module=module, config=ibau_config)
    assert loops.compiled(unlearn, "host", True)._cache_size() == 1
    assert loops.compiled(ascend, "host", True)._cache_size() == 1


# --------------------------------------------------------------------------- backend choices
def test_loops_run_on_the_host_on_cpu_and_as_one_scan_on_accelerators(monkeypatch):
    monkeypatch.delenv("BDJAX_LOOP", raising=False)
    assert jax.default_backend() != "cpu" or loops.loop_kind() == "host"
    assert loops.loop_kind(backend="cpu") == "host"
    assert loops.loop_kind(backend="gpu") == "scan" and loops.loop_kind(backend="tpu") == "scan"
    assert loops.loop_kind("scan", backend="cpu") == "scan"
    monkeypatch.setenv("BDJAX_LOOP", "scan")
    assert loops.loop_kind(backend="cpu") == "scan" and loops.loop_kind("host", backend="gpu") == "host"
    monkeypatch.setenv("BDJAX_LOOP", "while")
    with pytest.raises(ValueError, match="BDJAX_LOOP"):
        loops.loop_kind()


def test_sweeps_vmap_on_accelerators_and_loop_weight_changing_defenses_on_cpu(monkeypatch):
    monkeypatch.delenv("BDJAX_SWEEP", raising=False)
    assert not sweep.vectorise_cell("ft", backend="cpu")  # fine-tuning: a loop on CPU
    assert sweep.vectorise_cell("ft", backend="gpu")
    assert sweep.vectorise_cell("clp", backend="cpu") and sweep.vectorise_cell("suspicion", backend="cpu")
    assert not sweep.vectorise_cell("anp", backend="gpu")  # no batched implementation
    assert sweep.vectorise_cell("ft", True, backend="cpu") and not sweep.vectorise_cell("clp", False)
    monkeypatch.setenv("BDJAX_SWEEP", "vmap")
    assert sweep.vectorise_cell("ft", backend="cpu") and not sweep.vectorise_cell("anp")
    monkeypatch.setenv("BDJAX_SWEEP", "loop")
    assert not sweep.vectorise_cell("clp", backend="gpu")
    monkeypatch.setenv("BDJAX_SWEEP", "fast")
    with pytest.raises(ValueError, match="BDJAX_SWEEP"):
        sweep.vectorise_cell("ft")
