"""Neural Cleanse and I-BAU, the baselines BNA is compared with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.data.dataset import Dataset
from bdjax.defenses import ibau, neural_cleanse, reverse_engineer
from bdjax.defenses.reverse_engineer import ReverseConfig, Trigger
from bdjax.evaluation import evaluate_model


def empty_set(info) -> Dataset:
    return Dataset(np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32), info)


# --------------------------------------------------------------------------- Neural Cleanse
def test_infected_labels_flag_only_small_norm_outliers():
    norms = np.array([50.0, 52.0, 48.0, 51.0, 49.0, 4.0, 95.0])  # median 50, MAD 2
    index, infected = neural_cleanse.infected_labels(norms)
    np.testing.assert_allclose(index[5], 46.0 / (1.4826 * 2.0))
    assert infected.tolist() == [False] * 5 + [True, False]  # a large mask is not suspicious


def test_anomaly_index_takes_the_lower_median_as_backdoorbench():
    """BackdoorBench's torch.median takes the lower middle value; for an even number of labels
    that changes the verdict. Norms [2, 10, 11, 12, 13, 30]: lower median 11, |x − 11| =
    [9, 1, 0, 1, 2, 19], lower median 1 -> index of label 0 = 9 / 1.4826 = 6.07; NumPy's
    midpoint: median 11.5, MAD median of [9.5, 1.5, 0.5, 0.5, 1.5, 18.5] = 1.5 -> 4.27."""
    norms = np.array([2.0, 10.0, 11.0, 12.0, 13.0, 30.0])
    index, _ = neural_cleanse.infected_labels(norms)
    np.testing.assert_allclose(index[0], 9.0 / 1.4826)
    midpoint, _ = neural_cleanse.infected_labels(norms, median="midpoint")
    np.testing.assert_allclose(midpoint[0], 9.5 / (1.4826 * 1.5))
    assert neural_cleanse.NCConfig().median == "lower"
    # Where the two conventions disagree on the flag: [6, 9, 10, 11, 13, 14].
    edge = np.array([6.0, 9.0, 10.0, 11.0, 13.0, 14.0])
    assert neural_cleanse.infected_labels(edge)[1][0]  # (10 − 6) / (1.4826 · 1) = 2.70
    assert not neural_cleanse.infected_labels(edge, median="midpoint")[1][0]  # 4.5 / (1.4826 · 2) = 1.52
    # Odd counts (GTSRB's 43 labels): both conventions are np.median.
    odd = np.array([50.0, 52.0, 48.0, 51.0, 49.0, 4.0, 95.0])
    np.testing.assert_allclose(neural_cleanse.infected_labels(odd)[0], neural_cleanse.infected_labels(odd, median="midpoint")[0])


def test_nc_searches_as_its_reference_code_by_default():
    """Per-epoch cost schedule, tanh-space parameters starting at 1 (mask 0.88), 10 epochs; a
    dict override keeps the rest of that search (it does not fall back to BNA's step schedule)."""
    config = neural_cleanse.NCConfig()
    assert (config.reverse.schedule, config.reverse.init, config.reverse.epochs) == ("epoch", "ones", 10)
    assert neural_cleanse.NCConfig(reverse={"epochs": 2}).reverse.schedule == "epoch"
    state = reverse_engineer.search_start((4, 4, 3), jax.random.key(0), config.reverse)
    np.testing.assert_allclose(reverse_engineer._params_to_trigger(state.params, "patch").mask, (np.tanh(1.0) + 1) / 2,
                               rtol=1e-6)


def test_epoch_schedule_moves_the_cost_once_per_patience_epochs_not_steps():
    """NC's code: the cost doubles after ``patience`` (5) epochs whose *mean* batch success is
    >= the threshold, and is divided by 2^1.5 after 5 epochs below it; steps inside an epoch
    only accumulate."""
    config = ReverseConfig(schedule="epoch", init="ones", batch_size=2)
    state = reverse_engineer.search_start((4, 4, 3), jax.random.key(0), config)
    images = jnp.full((4, 4, 4, 3), 0.5)

    def logits_fn(x):  # always class 1: every batch succeeds for target 1
        return jnp.tile(jnp.array([[0.0, 5.0]]), (x.shape[0], 1))

    for epoch in range(5):
        for position in range(2):  # 4 images, batch 2
            state = reverse_engineer.search_step(logits_fn, images, 1, state, jax.random.key(epoch), config, position)
            assert float(state.cost) == pytest.approx(1e-3)
        state = reverse_engineer.search_epoch_end(state, config)
        assert float(state.cost) == pytest.approx(1e-3 * (2.0 if epoch == 4 else 1.0))
        assert bool(state.best.reached)
    # Five failing epochs (target 0 is never predicted) divide it by 2^1.5.
    for epoch in range(5):
        for position in range(2):
            state = reverse_engineer.search_step(logits_fn, images, 0, state, jax.random.key(epoch), config, position)
        state = reverse_engineer.search_epoch_end(state, config)
    assert float(state.cost) == pytest.approx(2e-3 / 2.0 ** 1.5)
    assert bool(state.went_up) and bool(state.went_down)


def test_start_cost_at_zero_sets_init_cost_after_patience_successful_epochs():
    config = ReverseConfig(schedule="epoch", start_cost_at_zero=True, batch_size=4)
    state = reverse_engineer.search_start((4, 4, 3), jax.random.key(0), config)
    assert float(state.cost) == 0.0
    images = jnp.full((4, 4, 4, 3), 0.5)
    for epoch in range(5):
        state = reverse_engineer.search_step(lambda x: jnp.tile(jnp.array([[0.0, 5.0]]), (x.shape[0], 1)), images, 1,
                                             state, jax.random.key(epoch), config, 0)
        state = reverse_engineer.search_epoch_end(state, config)
    assert float(state.cost) == pytest.approx(1e-3)


def test_nc_epoch_search_runs_end_to_end(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    config = neural_cleanse.NCConfig(reverse={"epochs": 2, "batch_size": 8})
    result = neural_cleanse.neural_cleanse(module, variables, random_dataset, jax.random.key(0), config)
    assert len(result.info["norms"]) == 4 and np.all(np.isfinite(result.info["anomaly_index"]))


def test_unlearning_set_stamps_the_fraction_and_keeps_true_labels(random_dataset):
    mask = jnp.zeros((32, 32, 1)).at[:4, :4].set(1.0)
    trigger = Trigger(mask, jnp.ones((32, 32, 3)), jnp.zeros((32, 32, 3)))
    repaired = neural_cleanse.unlearning_set(random_dataset, [trigger], 0.2, jax.random.key(0))
    stamped = np.any(repaired.images != random_dataset.images, axis=(1, 2, 3))
    assert stamped.sum() == 8  # 20% of 40
    assert np.all(repaired.images[stamped][:, :4, :4] == 255)
    np.testing.assert_array_equal(repaired.labels, random_dataset.labels)


def test_nc_bad_inputs(tiny_model, info):
    module, variables = tiny_model("medium-bn")
    with pytest.raises(ValueError, match="clean defense set"):
        neural_cleanse.neural_cleanse(module, variables, empty_set(info), jax.random.key(0))
    with pytest.raises(ValueError, match="patch"):
        neural_cleanse.NCConfig(reverse={"kind": "perturbation"})
    with pytest.raises(ValueError, match="unlearn_fraction"):
        neural_cleanse.NCConfig(unlearn_fraction=0.0)


# --------------------------------------------------------------------------- I-BAU
def test_implicit_hypergradient_is_exact_on_a_quadratic():
    """L_in = ½a‖δ − Bθ‖², so δ* = Bθ; L_out = ½‖δ‖² + c·θ has hypergradient B²θ + c.
    The K-term Neumann series gives c + αaB·Σ_k (1 − αa)^k δ: exact as K grows."""
    a, b, c, alpha = 2.0, 3.0, jnp.array([0.5, -1.0]), 0.25
    theta = jnp.array([1.0, 2.0])
    delta = b * theta  # the inner optimum

    def inner(d, t):
        return 0.5 * a * jnp.sum(jnp.square(d - b * t))

    def outer(d, t):
        return 0.5 * jnp.sum(jnp.square(d)) + jnp.sum(c * t)

    exact = b * b * theta + c
    np.testing.assert_allclose(ibau.implicit_hypergradient(inner, outer, delta, theta, 60, alpha), exact, rtol=1e-5)
    one_step = c + alpha * a * b * delta  # K = 1: v = ∇_δ L_out
    np.testing.assert_allclose(ibau.implicit_hypergradient(inner, outer, delta, theta, 1, alpha), one_step, rtol=1e-6)


def test_ibau_moves_params_not_batch_stats(tiny_model, random_dataset):
    # small-bn and K = 1 keep the second-order compile short (medium-bn with K = 5: ~65 s).
    module, variables = tiny_model("small-bn")
    result = ibau.ibau(module, variables, random_dataset, jax.random.key(0),
                       ibau.IBAUConfig(rounds=1, batch_size=20, learning_rate=1e-3, fixed_point_steps=1))
    assert len(result.info["perturbation_norms"]) == 1 and result.info["perturbation_norms"][0] <= 10.0 + 1e-4
    for old, new in zip(jax.tree_util.tree_leaves(variables["batch_stats"]),
                        jax.tree_util.tree_leaves(result.variables["batch_stats"])):
        np.testing.assert_array_equal(old, new)
    moved = [not np.allclose(o, n) for o, n in zip(jax.tree_util.tree_leaves(variables["params"]),
                                                   jax.tree_util.tree_leaves(result.variables["params"]))]
    assert all(moved)


def test_ibau_bad_inputs(tiny_model, info):
    module, variables = tiny_model("medium-bn")
    with pytest.raises(ValueError, match="clean defense set"):
        ibau.ibau(module, variables, empty_set(info), jax.random.key(0))
    with pytest.raises(ValueError, match="fixed_point_steps"):
        ibau.IBAUConfig(fixed_point_steps=0)


# --------------------------------------------------------------------------- real backdoor
@pytest.mark.realdata
@pytest.mark.heavy
def test_neural_cleanse_flags_label_14_and_unlearning_lowers_asr(zoo_badnets_run, gtsrb_ten_per_class):
    """Measured (zoo v2 medium-bn BadNets, 430 clean images, 2 cores, 103 s): label 14 alone flagged,
    ASR 0.999 -> 0.001, ACC 0.949 -> 0.935, SIA 0.921 (zoo v1: labels 5 and 14 flagged, 5 a false
    positive, ASR 0.995 -> 0.004, ACC 0.894 -> 0.851)."""
    run = zoo_badnets_run
    clean, sets = gtsrb_ten_per_class
    config = neural_cleanse.NCConfig(reverse=ReverseConfig(steps=60, batch_size=16, chunk_size=43))
    result = neural_cleanse.neural_cleanse(run.module, run.variables, clean, jax.random.key(0), config)
    assert 14 in result.info["infected"]
    before = evaluate_model(run.module, run.variables, sets)
    after = evaluate_model(run.module, result.variables, sets)
    print(f"NC: infected {result.info['infected']}, before {before}, after {after}")
    assert before.asr > 0.95 and after.asr < 0.1
    assert after.acc > before.acc - 0.05


@pytest.mark.realdata
@pytest.mark.heavy
def test_ibau_lowers_asr(zoo_badnets_run, gtsrb_ten_per_class):
    """Measured (same model and set, defaults except outer lr 1e-3, 2 cores, 40 s): ASR 0.999 -> 0.219,
    ACC 0.949 -> 0.909, SIA 0.092 (zoo v1: ASR 0.995 -> 0.020, ACC 0.894 -> 0.807). On the stronger
    model I-BAU lowers the backdoor by four fifths at a 4-point ACC cost but does not remove it."""
    run = zoo_badnets_run
    clean, sets = gtsrb_ten_per_class
    result = ibau.ibau(run.module, run.variables, clean, jax.random.key(0), ibau.IBAUConfig(learning_rate=1e-3))
    before = evaluate_model(run.module, run.variables, sets)
    after = evaluate_model(run.module, result.variables, sets)
    print(f"I-BAU: before {before}, after {after}")
    assert before.asr > 0.95 and after.asr < 0.4
    assert after.acc > before.acc - 0.1
