"""CETF (CAM-focus evolutionary trigger filter) and the BN repairs, as the paper claims them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses
from bdjax.data.dataset import GTSRB, Dataset
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


def test_grad_cam_default_layer_of_a_resnet_is_its_last_block_after_the_shortcut(tiny_model, images):
    """pytorch-grad-cam's ``model.layer4[-1]``: the block's output, not the residual branch's BN."""
    module, variables = tiny_model("resnet20")
    layer = gradcam.default_feature_layer(module)
    assert layer == ("stage3_2",) and layer != module.conv_units()[-1].output
    maps, _ = gradcam.grad_cam(module, variables, images)
    block, _ = gradcam.grad_cam(module, variables, images, layer=layer)
    np.testing.assert_array_equal(maps, block)


@pytest.mark.realdata
def test_resnet_grad_cam_sees_a_corner_patch_from_the_last_block_not_its_residual_branch(data_dir):
    """Zoo v2's GTSRB ResNet-20 with CETF's bottom-right 2x2 patch: on 64 triggered inputs the
    default map (the last block's output) is hot on the trigger; the residual branch's BN output
    (the default before 2026-12-05) is not (measured: 0.64 vs 0.29 mean normalised value)."""
    from bdjax import checkpoint
    from bdjax.data.dataset import to_float
    from bdjax.runs import split_for_defense
    from conftest import ZOO_V2_DIR

    run = checkpoint.load(ZOO_V2_DIR / "resnet20-gtsrb-badnets-br")
    _, sets = split_for_defense(run, 2, 0, data_dir)
    triggered = sets.triggered.images[np.linspace(0, len(sets.triggered) - 1, 64).round().astype(int)]
    on_trigger = np.asarray(run.attack.mask)[..., 0] > 0
    block, predicted = gradcam.grad_cam(run.module, run.variables, to_float(triggered))
    branch, _ = gradcam.grad_cam(run.module, run.variables, to_float(triggered),
                                 layer=run.module.conv_units()[-1].output)
    assert np.mean(np.asarray(predicted) == run.target.target) > 0.95
    block_heat, branch_heat = np.asarray(block)[:, on_trigger].mean(), np.asarray(branch)[:, on_trigger].mean()
    print(f"mean Grad-CAM on the trigger: block {block_heat:.3f}, residual branch {branch_heat:.3f}")
    assert block_heat > 0.5 and branch_heat < 0.4, (block_heat, branch_heat)


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


def test_bn_cleaning_splits_the_repair_set_into_near_equal_batches(tiny_model, monkeypatch):
    """129 repair images at batch 32 (3 per class on GTSRB) give batches of 26 and 25, not four of
    32 and a 1-image remainder whose moments would move the running statistics as far as a batch's."""
    module, variables = tiny_model("medium-bn")
    clean = Dataset(np.zeros((129, 32, 32, 3), np.uint8), np.arange(129) % 43, GTSRB)
    sizes = []
    monkeypatch.setattr(bn_repair, "bn_cleaning", lambda module, variables, images, momentum: sizes.append(len(images))
                        or variables)
    trigger = cetf.Trigger(np.full((2, 2, 3), 255, np.uint8), 0, 0)
    bn_repair.repair_with_triggers("bn-clean", module, variables, clean, [trigger], jax.random.key(0),
                                   jax.random.key(1), bn_repair.RepairConfig(per_class=3))
    assert sizes == [26, 26, 26, 26, 25] * 3


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


def test_region_limit_settings_are_checked():
    for bad in (dict(max_region=1.5), dict(max_region=-0.1), dict(calibration_size=-1),
                dict(calibration_size=11, num_filter=10), dict(max_region=0.1, calibration_size=5)):
        with pytest.raises(ValueError, match="max_region|calibration_size"):
            cetf.CETFConfig(**bad)


def test_region_limit_is_exact_in_pixels_on_any_image_size():
    boxes = np.array([[0, 0, 10, 25], [0, 0, 1, 251], [3, 4, 1, 1]])  # 250, 251 and 1 pixels
    for height, width in ((28, 28), (32, 32), (30, 45)):
        np.testing.assert_array_equal(cetf.within_limit(boxes, 250 / (height * width), (5, height, width, 3)),
                                      [True, False, True])
    assert cetf.within_limit(boxes, None, (28, 28, 3)).all() and not cetf.within_limit(boxes, 0.0, (28, 28, 3)).any()


def _screening(boxes, poisoned):
    n = len(boxes)
    return cetf.Screening(np.array(poisoned), np.zeros(n, np.int32), np.array(boxes, np.int32), np.zeros(n),
                          np.ones(n), np.zeros((n, 4), np.int32), np.zeros((n, 2)), np.ones(n, np.int32))


def test_calibration_sets_the_limit_below_the_smallest_flagged_clean_region(random_dataset, monkeypatch):
    config = cetf.CETFConfig(num_auxiliary=10, calibration_size=5, num_filter=100)
    key = jax.random.key(0)
    aux_key = jax.random.split(key)[0]
    auxiliary, filter_images = cetf.auxiliary_split(random_dataset, aux_key, config)
    assert (len(auxiliary), len(filter_images)) == (10, 30)
    calibration = filter_images[:5]  # screened with the paper's rule; never auxiliary images

    screened = {}

    def fake_screen(module, variables, images, auxiliary, filter_images, key, config):
        screened.update(images=images, config=config)
        # Areas 12x10 = 120 (flagged), 3x3 = 9 (not flagged), 10x9 = 90 (flagged), 1x1, 20x20.
        return _screening([[0, 0, 12, 10], [0, 0, 3, 3], [0, 0, 10, 9], [0, 0, 1, 1], [0, 0, 20, 20]],
                          [True, False, True, False, False])

    monkeypatch.setattr(cetf, "screen", fake_screen)
    calibrated, info = cetf.calibrate_max_region(None, None, random_dataset, key, config)
    np.testing.assert_array_equal(screened["images"], calibration)
    assert screened["config"].max_region is None and screened["config"].calibration_size == 0  # the paper's rule
    assert calibrated.max_region == pytest.approx(89 / 1024) and calibrated.calibration_size == 0
    assert info["calibration_flagged"] == 2 and info["calibration_areas"] == [120, 9, 90, 1, 400]

    monkeypatch.setattr(cetf, "screen", lambda *args: _screening([[0, 0, 5, 5]], [False]))
    unlimited, info = cetf.calibrate_max_region(None, None, random_dataset, key, config)
    assert unlimited.max_region is None and info["max_region"] is None  # no clean region flagged: no limit
    assert cetf.calibrate_max_region(None, None, random_dataset, key, cetf.CETFConfig()) == (cetf.CETFConfig(), {})
    with pytest.raises(ValueError, match="at least 41"):
        cetf.calibrate_max_region(None, None, random_dataset, key, cetf.CETFConfig(calibration_size=31))


def test_region_limit_only_removes_flags_from_large_regions(tiny_model, images, random_dataset):
    module, variables = tiny_model("medium-bn")
    config = cetf.CETFConfig(population_size=4, max_generations=2, patience=1, num_auxiliary=4,
                             filter_threshold=-1.0)  # paste-and-filter passes every region
    auxiliary, filter_images = cetf.auxiliary_split(random_dataset, jax.random.key(0), config)
    uint8 = np.asarray(random_dataset.images[:4])
    paper = cetf.screen(module, variables, uint8, auxiliary, filter_images, jax.random.key(1), config)
    areas = paper.box[:, 2] * paper.box[:, 3]
    limit = float(np.median(areas)) / (32 * 32)
    limited = cetf.screen(module, variables, uint8, auxiliary, filter_images, jax.random.key(1),
                          dataclasses.replace(config, max_region=limit))
    np.testing.assert_array_equal(limited.box, paper.box)  # the search is the paper's
    np.testing.assert_array_equal(limited.poisoned, paper.poisoned & (areas <= limit * 32 * 32))
    nothing = cetf.screen(module, variables, uint8, auxiliary, filter_images, jax.random.key(1),
                          dataclasses.replace(config, max_region=0.0))
    assert not nothing.poisoned.any()


def test_cetf_and_its_repairs_calibrate_before_they_screen(tiny_model, random_dataset):
    module, variables = tiny_model("medium-bn")
    search = cetf.CETFConfig(population_size=4, max_generations=2, patience=1, num_auxiliary=4, calibration_size=3)
    result = cetf.cetf(module, variables, random_dataset, jax.random.key(0), search)
    calibration = result.info["calibration"]
    assert calibration["calibration_images"] == 3 and len(calibration["calibration_areas"]) == 3
    assert result.classifier(np.asarray(random_dataset.images[:2]))[1].shape == (2,)
    repair = bn_repair.RepairConfig(suspect_images=np.asarray(random_dataset.images[:2]), cetf=search, epochs=1)
    _, info = bn_repair.extract_triggers(module, variables, random_dataset, jax.random.key(0), repair)
    assert info["calibration"] == calibration  # same key: same calibration images and limit


def test_cetf_defenses_are_registered():
    assert defenses.get("cetf").detector
    for name in ("cetf+bn-clean", "cetf+bn-unlearn", "cetf+unlearn"):
        assert not defenses.get(name).detector


# --------------------------------------------------------------------------- real data
# Smaller than the paper's search (population 40, 100 generations, patience 10) to fit the
# test budget on 2 CPU cores: population 20, at most 15 generations, patience 5, 10 + 10 images,
# the region limit calibrated on 10 of the defender's clean images (measured: ~30 s in all).
REAL_CONFIG = cetf.CETFConfig(population_size=20, max_generations=15, patience=5, batch_size=4,
                              calibration_size=10)
REAL_INPUTS = 10


@pytest.fixture(scope="module")
def badnets_screening(data_dir, gtsrb_test):
    """CETF on 10 successfully triggered and 10 clean GTSRB test images of zoo v2's small-bn
    BadNets model (ACC 0.94 / ASR 0.99 on these images), as ``cetf`` runs it: the region limit
    calibrated first, then the screening with the same auxiliary and filter images.

    The defender's clean set (2 per class, the paper's setting) is held out of the evaluation set.
    """
    from conftest import ZOO_V2_DIR, optimized_compilation

    from bdjax import checkpoint
    from bdjax.data import clean_defense_split
    from bdjax.evaluation import TestSets

    run = checkpoint.load(ZOO_V2_DIR / "small-bn-gtsrb-badnets")
    clean, evaluation = clean_defense_split(gtsrb_test, 2, 0)
    sets = TestSets.build(evaluation, run.attack, run.target)
    with optimized_compilation():
        hits = predict(run.module, run.variables, sets.triggered.images) == 14
        triggered = sets.triggered.images[np.flatnonzero(hits)[:REAL_INPUTS]]
        clean_inputs = sets.clean.images[:REAL_INPUTS]
        key = jax.random.key(0)
        config, calibration = cetf.calibrate_max_region(run.module, run.variables, clean, key, REAL_CONFIG)
        auxiliary, filter_images = cetf.auxiliary_split(clean, jax.random.split(key)[0], config)
        found = cetf.screen(run.module, run.variables, np.concatenate([triggered, clean_inputs]),
                            auxiliary, filter_images, jax.random.key(1), config)
    return run, clean, sets, triggered, found, calibration


@pytest.mark.realdata
@pytest.mark.slow
def test_cetf_with_a_calibrated_region_limit_flags_triggered_inputs_and_passes_most_clean_ones(badnets_screening):
    """Measured: the paper's rule alone flags 10/10 triggered and 7/10 clean inputs (the clean
    regions are pictograms of 130-360 pixels that flip other signs); the limit calibrated on the
    defender's clean images (251 pixels: 4 of its 10 calibration images were flagged) keeps
    10/10 and flags 2/10 clean. The triggered regions start at the upper-left corner."""
    _, _, _, triggered, found, calibration = badnets_screening
    n = len(triggered)
    paper_rule = (found.fitness >= 0) & (found.switched > REAL_CONFIG.filter_threshold)
    tpr, fpr = found.poisoned[:n].mean(), found.poisoned[n:].mean()
    print(f"calibration {calibration}; paper rule TPR {paper_rule[:n].mean():.2f} FPR {paper_rule[n:].mean():.2f}; "
          f"with the limit TPR {tpr:.2f} FPR {fpr:.2f}, boxes {found.box.tolist()}")
    assert calibration["calibration_images"] == 10 and calibration["max_region"] is not None
    assert tpr >= 0.9 and fpr <= 0.3, (tpr, fpr, found.box.tolist(), found.switched.tolist())
    assert fpr < paper_rule[n:].mean() and tpr == paper_rule[:n].mean()  # the limit removes clean flags only
    boxes = found.box[:n][found.poisoned[:n]]  # the regions sit on the 2x2 upper-left trigger
    assert np.all((boxes[:, 0] <= 1) & (boxes[:, 1] <= 1)), boxes.tolist()


@pytest.mark.realdata
@pytest.mark.slow
def test_bn_repairs_with_extracted_triggers_lower_asr_and_keep_acc(badnets_screening):
    """BN-cleaning and BN-unlearning with the triggers CETF extracted (12: 10 true regions and 2
    clean pictograms) pasted on 2 clean images per class with their true labels.

    Measured: ASR 0.994 -> 0.822 (BN-cleaning), 0.333 (BN-unlearning); ACC 0.937 -> 0.934, 0.939.
    The paper: ASR ~0 for both (λ = 0.1 moves the statistics only part of the way)."""
    from bdjax.evaluation import evaluate_model

    run, clean, sets, triggered, found, _ = badnets_screening
    triggers = found.triggers(np.concatenate([triggered, sets.clean.images[:REAL_INPUTS]]))
    assert triggers, "CETF extracted no trigger"
    before = evaluate_model(run.module, run.variables, sets)
    after = {}
    for kind in ("bn-clean", "bn-unlearn"):  # RepairConfig's defaults: 2 per class, 3 epochs, λ = 0.1
        repaired, info = bn_repair.repair_with_triggers(kind, run.module, run.variables, clean, triggers,
                                                        jax.random.key(2), jax.random.key(3))
        assert info["repair_size"] == 2 * 43
        after[kind] = evaluate_model(run.module, repaired, sets)
    print(f"before {before}, after {after}")
    assert before.asr > 0.95
    assert after["bn-clean"].asr < before.asr - 0.1 and after["bn-unlearn"].asr < before.asr - 0.5, after
    assert all(report.acc > before.acc - 0.02 for report in after.values()), after
