"""CETF (CAM-focus evolutionary trigger filter) and the BN repairs, as the paper claims them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses
from bdjax.defenses import bn_repair, cetf, gradcam
from bdjax.models.inference import predict
from bdjax.surgery import batch_moments


# --------------------------------------------------------------------------- Grad-CAM
def test_grad_cam_maps_are_normalised_input_sized_and_follow_the_prediction(tiny_model, images):
    module, variables = tiny_model("medium-bn")
    maps, predicted = gradcam.grad_cam(module, variables, images)
    assert maps.shape == images.shape[:3]
    maps = np.asarray(maps)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    for m in maps:  # each map is min-max normalised (or all zero when constant)
        assert m.max() == pytest.approx(1.0, abs=1e-5) or not m.any()
    np.testing.assert_array_equal(predicted, predict(module, variables, np.asarray(images)))
    earlier, _ = gradcam.grad_cam(module, variables, images, layer=("bn2",))
    assert earlier.shape == images.shape[:3]


def test_grad_cam_default_layer_is_the_last_conv_unit(tiny_model):
    module, _ = tiny_model("medium-bn")
    assert gradcam.default_feature_layer(module) == module.conv_units()[-1].output


# --------------------------------------------------------------------------- CAM-focus prior
def test_prior_region_is_the_dilated_bounding_box_of_the_hot_pixels():
    prior_region = jax.jit(cetf.prior_region, static_argnums=(1, 2))
    cam = jnp.zeros((32, 32)).at[5:8, 10:14].set(0.9).at[20, 20].set(0.69)
    box = prior_region(cam, 0.7, 4)
    np.testing.assert_array_equal(box, [1, 6, 12, 18])  # rows 5..7, cols 10..13, grown by 4
    corner = prior_region(jnp.zeros((32, 32)).at[0:2, 30:32].set(1.0), 0.7, 4)
    np.testing.assert_array_equal(corner, [0, 26, 6, 32])  # clipped to the image
    empty = prior_region(jnp.full((32, 32), 0.5), 0.7, 4)
    np.testing.assert_array_equal(empty, [0, 0, 32, 32])  # nothing hot: search everywhere


def test_decode_gives_valid_rectangles_inside_the_prior():
    prior = jnp.array([4, 6, 12, 20], jnp.int32)
    wild = jnp.array([[-5.0, 100.0, 50.0, 0.2], [7.4, 8.6, 2.5, 3.2], [11.0, 19.0, 3.0, 3.0]])
    boxes = np.asarray(jax.vmap(cetf.decode, in_axes=(0, None))(wild, prior))
    np.testing.assert_array_equal(boxes[1], [7, 9, 2, 3])
    top, left, height, width = boxes.T
    assert (height >= 1).all() and (width >= 1).all()
    assert (top >= 4).all() and (top + height <= 12).all() and (left >= 6).all() and (left + width <= 20).all()


# --------------------------------------------------------------------------- DE
def test_de_variant_mutates_around_the_member_itself():
    """Each offspring coordinate is either the parent's or u + α(u_r1 − u_r2) (eqs. 1-2)."""
    strategy = cetf.CETFDifferentialEvolution(6, solution=jnp.zeros(4))
    params = strategy.default_params
    assert (params.differential_weight, params.crossover_rate) == (0.3, 0.5)
    population = jnp.arange(24.0).reshape(6, 4) * jnp.array([[1.0, 10.0, 100.0, 1000.0]])
    state = strategy.init(jax.random.key(0), population, jnp.zeros(6), params)
    offspring, _ = strategy.ask(jax.random.key(1), state, params)
    changed = np.asarray(offspring != population)
    assert changed.any() and not changed.all()
    # Differences of rows of an arithmetic grid: a mutated coordinate moves by 0.3 * k * step.
    steps = np.array([4.0, 40.0, 400.0, 4000.0])
    moves = np.asarray(offspring - population) / (0.3 * steps[None, :])
    np.testing.assert_allclose(moves, np.round(moves), atol=1e-4)


def test_de_search_finds_the_trigger_of_a_toy_model():
    """A toy 'model' predicts 1 iff a 2x2 yellow patch sits at rows 3-4, cols 5-6. The DE (population
    20, 40 generations) must find a small region covering the patch: fitness ≈ 2000 (flag and all
    flips), improving over the generations."""
    size = 16

    def toy_logits(batch):
        patch = batch[:, 3:5, 5:7, :]
        yellow = (patch[..., 0].min(axis=(1, 2)) > 0.9) & (patch[..., 2].max(axis=(1, 2)) < 0.1)
        return jnp.stack([jnp.zeros(batch.shape[0]), jnp.where(yellow, 1.0, -1.0)], axis=-1)

    rng = np.random.default_rng(0)
    image = rng.uniform(0.3, 0.7, (size, size, 3)).astype(np.float32)
    image[3:5, 5:7] = [1.0, 1.0, 0.0]
    auxiliary = rng.uniform(0.3, 0.7, (10, size, size, 3)).astype(np.float32)
    found = jax.jit(lambda key: cetf.search_regions(
        toy_logits, jnp.asarray(image)[None], jnp.array([1]), jnp.array([[0, 0, size, size]], jnp.int32),
        jnp.asarray(auxiliary), jnp.zeros(10, jnp.int32), key,
        population_size=20, max_generations=40, patience=10))(jax.random.key(0))
    top, left, height, width = np.asarray(found.box[0])
    assert top <= 3 and left <= 5 and top + height >= 5 and left + width >= 7  # covers the patch
    assert float(found.fitness[0]) > 2000 - 30  # flag + flips, area at most ~5x5
    history = np.asarray(found.history[0])[: int(found.generations[0]) + 1]
    assert np.all(np.diff(history) >= 0) and history[-1] > history[0]


# --------------------------------------------------------------------------- BN repairs
def test_bn_cleaning_changes_only_batch_stats_by_the_momentum_rule(tiny_model, images):
    module, variables = tiny_model("medium-bn")
    cleaned = bn_repair.bn_cleaning(module, variables, images, momentum=0.3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, cleaned["params"], variables["params"])
    moments = batch_moments(module, variables, images)
    expected = jax.tree_util.tree_map(lambda old, new: 0.7 * old + 0.3 * new, variables["batch_stats"], moments)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           cleaned["batch_stats"], expected)
    # λ = 0.1 is exactly what a train-mode forward pass of flax's BatchNorm (momentum 0.9) does.
    _, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
    default = bn_repair.bn_cleaning(module, variables, images, momentum=0.1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           default["batch_stats"], updates["batch_stats"])


def test_bn_methods_on_a_model_without_batch_norm_raise(tiny_model, images, random_dataset):
    module, variables = tiny_model("medium")
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_repair.bn_cleaning(module, variables, images)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_repair.bn_unlearning(module, variables, random_dataset, jax.random.key(0))
    config = bn_repair.RepairConfig(suspect_images=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_repair.cetf_bn_clean(module, variables, random_dataset, jax.random.key(0), config)
    trigger = cetf.Trigger(np.full((2, 2, 3), 255, np.uint8), 0, 0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_repair.repair_with_triggers("bn-clean", module, variables, random_dataset, [trigger],
                                       jax.random.key(0), jax.random.key(1))
    with pytest.raises(ValueError, match="repair must be one of"):
        bn_repair.repair_with_triggers("bn-reset", module, variables, random_dataset, [trigger],
                                       jax.random.key(0), jax.random.key(1))


def test_repairs_need_inputs_to_screen(tiny_model, random_dataset):
    module, variables = tiny_model("medium-bn")
    with pytest.raises(ValueError, match="suspect_images"):
        bn_repair.cetf_bn_clean(module, variables, random_dataset, jax.random.key(0), bn_repair.RepairConfig())


def test_bn_unlearning_touches_only_gamma_and_beta(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    new, losses = bn_repair.bn_unlearning(module, variables, random_dataset, jax.random.key(0),
                                          epochs=1, batch_size=20)
    assert len(losses) == 1 and np.isfinite(losses[0])  # one mean loss per epoch
    for path, leaf in jax.tree_util.tree_leaves_with_path(new["params"]):
        old = variables["params"]
        for key in path:
            old = old[key.key]
        if path[0].key.startswith("bn"):
            continue
        np.testing.assert_array_equal(leaf, old)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), new["params"], variables["params"])
    assert any(v for k, v in changed.items() if k.startswith("bn") for v in v.values())


def test_repair_set_carries_the_trigger_and_the_true_labels(random_dataset):
    trigger = cetf.Trigger(np.full((2, 3, 3), 255, np.uint8), top=1, left=4)
    repair = bn_repair.triggered_repair_set(random_dataset, [trigger], per_class=2, key=jax.random.key(0))
    assert len(repair) == 2 * 4 and sorted(np.bincount(repair.labels)) == [2, 2, 2, 2]
    assert (repair.images[:, 1:3, 4:7] == 255).all()
    # Outside the patch each image is a clean image of the same (true) class.
    outside = np.ones((32, 32), bool)
    outside[1:3, 4:7] = False
    for image, label in zip(repair.images, repair.labels):
        same = [np.array_equal(image[outside], c[outside]) for c in random_dataset.images]
        assert random_dataset.labels[int(np.argmax(same))] == label and any(same)


def test_cetf_defenses_are_registered():
    assert defenses.get("cetf").detector
    for name in ("cetf+bn-clean", "cetf+bn-unlearn", "cetf+unlearn"):
        assert not defenses.get(name).detector


# --------------------------------------------------------------------------- real data
# Smaller than the paper's search (population 40, 100 generations, patience 10) to fit the
# test budget on 2 CPU cores: population 20, at most 15 generations, patience 5, 10 + 10 images
# (measured: ~80 s for the screening on a loaded 2-core machine).
REAL_CONFIG = cetf.CETFConfig(population_size=20, max_generations=15, patience=5, batch_size=4)
REAL_INPUTS = 10


@pytest.fixture(scope="module")
def badnets_screening(gtsrb_badnets_run, gtsrb_test):
    """CETF on 10 successfully triggered and 10 clean GTSRB test images of the BadNets model.

    The defender's clean set (2 per class, the paper's setting) is held out of the evaluation set.
    """
    from conftest import optimized_compilation

    from bdjax.data import clean_defense_split
    from bdjax.evaluation import TestSets

    run = gtsrb_badnets_run
    clean, evaluation = clean_defense_split(gtsrb_test, 2, 0)
    sets = TestSets.build(evaluation, run.attack, run.target)
    with optimized_compilation():
        hits = predict(run.module, run.variables, sets.triggered.images) == 14
        triggered = sets.triggered.images[np.flatnonzero(hits)[:REAL_INPUTS]]
        clean_inputs = sets.clean.images[:REAL_INPUTS]
        auxiliary, filter_images = cetf.auxiliary_split(clean, jax.random.key(0), REAL_CONFIG)
        found = cetf.screen(run.module, run.variables, np.concatenate([triggered, clean_inputs]),
                            auxiliary, filter_images, jax.random.key(1), REAL_CONFIG)
    return run, clean, sets, triggered, found


@pytest.mark.realdata
@pytest.mark.slow
def test_cetf_flags_triggered_inputs_and_passes_clean_ones(badnets_screening):
    _, _, _, triggered, found = badnets_screening
    n = len(triggered)
    tpr, fpr = found.poisoned[:n].mean(), found.poisoned[n:].mean()
    print(f"TPR {tpr:.2f}, FPR {fpr:.2f}, boxes {found.box[:n][found.poisoned[:n]].tolist()}")
    # Measured on the committed test model: TPR 0.9, FPR 0.3 (3 of 10 clean inputs: a region of
    # this weak model's (ACC 0.60) clean images also flips > 50% of the filter images; the regions
    # found on triggered inputs start at the corner but are large, up to 30x3 or 19x15 pixels).
    # The paper reports ~0 FPR.
    assert tpr >= 0.8 and fpr <= 0.4, (tpr, fpr, found.box[:n].tolist(), found.switched.tolist())
    # The extracted regions sit on the 2x2 upper-left trigger.
    boxes = found.box[:n][found.poisoned[:n]]
    assert np.all((boxes[:, 0] <= 1) & (boxes[:, 1] <= 1)), boxes.tolist()


@pytest.mark.realdata
@pytest.mark.slow
def test_bn_cleaning_with_extracted_triggers_lowers_asr_and_keeps_acc(badnets_screening):
    from bdjax.evaluation import evaluate_model

    run, clean, sets, triggered, found = badnets_screening
    triggers = found.triggers(np.concatenate([triggered, sets.clean.images[:REAL_INPUTS]]))
    assert triggers, "CETF extracted no trigger"
    # RepairConfig's defaults: 2 images per class, 3 epochs, batches of 32, λ = 0.1.
    cleaned, info = bn_repair.repair_with_triggers("bn-clean", run.module, run.variables, clean, triggers,
                                                   jax.random.key(2), jax.random.key(3))
    assert info["repair_size"] == 2 * 43
    before = evaluate_model(run.module, run.variables, sets)
    after = evaluate_model(run.module, cleaned, sets)
    print(f"before {before}, after BN-cleaning {after}")
    # Measured: ASR 0.985 -> 0.876, ACC 0.616 -> 0.573. λ = 0.1 moves the statistics only part of
    # the way (on an earlier 0.64-ACC training of this recipe, the TRUE trigger and λ = 0.3 gave ASR
    # 0.42 but ACC 0.56), far from the paper's ~0.
    assert after.asr < before.asr - 0.05 and after.acc > before.acc - 0.05, (before, after)
