"""STRIP and NEO, the input filters the CETF paper compares with, as their papers claim them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses import neo, strip


def numpy_entropy_bits(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return -(probs * np.log2(np.where(probs > 0, probs, 1.0))).sum(axis=-1)


def toy_patch_logits(batch):
    """A toy 2-class 'model': class 1 iff a yellow 2x2 patch sits at rows 3-4, cols 5-6; the class-1
    logit grows with the number of yellow pixels there (a partly blocked patch still counts some)."""
    patch = batch[:, 3:5, 5:7, :]
    yellow = ((patch[..., 0] > 0.9) & (patch[..., 1] > 0.9) & (patch[..., 2] < 0.1)).sum(axis=(1, 2))
    return jnp.stack([jnp.zeros(batch.shape[0]), yellow - 3.5], axis=-1)


# --------------------------------------------------------------------------- STRIP math
def test_prediction_entropy_matches_numpy_in_bits():
    logits = np.random.default_rng(0).normal(0.0, 3.0, (7, 43)).astype(np.float32)
    np.testing.assert_allclose(strip.prediction_entropy(jnp.asarray(logits)), numpy_entropy_bits(logits),
                               rtol=1e-5, atol=1e-5)
    assert float(strip.prediction_entropy(jnp.zeros(8))) == pytest.approx(3.0)  # uniform over 8 = 3 bits


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 1.0)])
def test_blend_entropy_is_the_mean_entropy_of_the_clipped_blends(weights):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
    overlays = rng.uniform(0, 1, (5, 8, 8, 3)).astype(np.float32)
    projection = rng.normal(0, 1, (8 * 8 * 3, 6)).astype(np.float32)

    def logits_fn(batch):
        return batch.reshape(batch.shape[0], -1) @ projection

    got = strip.blend_entropy(logits_fn, jnp.asarray(image), jnp.asarray(overlays), *weights)
    blends = np.clip(weights[0] * image[None] + weights[1] * overlays, 0.0, 1.0)
    expected = numpy_entropy_bits(blends.reshape(5, -1) @ projection).mean()
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


def test_overlays_of_a_clean_image_never_include_itself():
    indices = np.asarray(strip.overlay_indices(jax.random.key(0), 6, 6, 200, exclude_self=True))
    assert indices.shape == (6, 200) and indices.min() >= 0 and indices.max() <= 5
    for i, row in enumerate(indices):
        assert i not in row and len(np.unique(row)) == 5  # every other image is drawn
    free = np.asarray(strip.overlay_indices(jax.random.key(0), 3, 6, 50))
    assert free.min() >= 0 and free.max() <= 5


def test_threshold_is_the_clean_set_quantile_at_the_false_positive_rate(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    config = strip.STRIPConfig(num_overlays=8, false_positive_rate=0.15)
    threshold = strip.clean_threshold(module, variables, random_dataset, jax.random.key(0), config)
    assert threshold.clean_entropies.shape == (len(random_dataset),)
    assert threshold.value == pytest.approx(float(np.quantile(threshold.clean_entropies, 0.15)))
    assert threshold.flags(threshold.clean_entropies).mean() <= 0.15  # below the quantile: at most 15%
    # The registered detector uses the same rule; its classifier returns predictions and rejections.
    result = strip.strip(module, variables, random_dataset, jax.random.key(1), config)
    assert result.info["threshold"] == pytest.approx(float(np.quantile(result.info["clean_entropies"], 0.15)))
    predicted, rejected = result.classifier(random_dataset.images)
    assert predicted.shape == rejected.shape == (len(random_dataset),) and rejected.dtype == bool


@pytest.fixture
def empty_clean_set(info) -> Dataset:
    return Dataset(np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32), info)


def test_strip_rejects_bad_input(tiny_model, random_dataset, empty_clean_set):
    module, variables = tiny_model("small-bn")
    with pytest.raises(ValueError, match="at least 2"):
        strip.strip(module, variables, empty_clean_set, jax.random.key(0), strip.STRIPConfig())
    with pytest.raises(ValueError, match="false_positive_rate"):
        strip.clean_threshold(module, variables, random_dataset, jax.random.key(0),
                              strip.STRIPConfig(false_positive_rate=1.5))
    with pytest.raises(TypeError, match="uint8"):
        strip.check_inputs(np.zeros((2, 32, 32, 3), np.float32), (32, 32, 3), "STRIP")
    with pytest.raises(ValueError, match="shape"):
        strip.check_inputs(np.zeros((32, 32, 3), np.uint8), (32, 32, 3), "STRIP")
    with pytest.raises(ValueError, match="shape"):
        strip.check_inputs(np.zeros((2, 28, 28, 3), np.uint8), (32, 32, 3), "STRIP")


# --------------------------------------------------------------------------- NEO math
@pytest.mark.parametrize("size,stride", [(4, 2), (3, 2), (5, 4), (32, 1)])
def test_blocker_positions_cover_the_image(size, stride):
    positions = neo.blocker_positions(32, 32, size, stride)
    covered = np.zeros((32, 32), int)
    for top, left in positions:
        assert 0 <= top <= 32 - size and 0 <= left <= 32 - size
        covered[top:top + size, left:left + size] += 1
    assert covered.min() >= 1
    assert len({tuple(p) for p in positions}) == len(positions)
    # A trigger up to (size - stride + 1) pixels wide lies whole under some blocker.
    trigger = size - stride + 1
    for top in range(32 - trigger + 1):
        assert any(t <= top and top + trigger <= t + size for t in np.unique(positions[:, 0]))


def test_blocker_positions_reject_bad_sizes():
    with pytest.raises(ValueError, match="blocker size"):
        neo.blocker_positions(32, 32, 0, 2)
    with pytest.raises(ValueError, match="blocker size"):
        neo.blocker_positions(32, 32, 33, 2)
    with pytest.raises(ValueError, match="stride"):
        neo.blocker_positions(32, 32, 4, 0)


def test_dominant_colour_is_the_largest_cluster_centre():
    rng = np.random.default_rng(2)
    colours = np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.8, 0.1]], np.float32)
    which = rng.choice(3, size=32 * 32, p=[0.55, 0.3, 0.15])
    image = colours[which] + rng.normal(0, 0.02, (32 * 32, 3)).astype(np.float32)
    dominant = jax.jit(neo.dominant_colour)(jnp.asarray(image.reshape(32, 32, 3)))
    np.testing.assert_allclose(dominant, image[which == 0].mean(axis=0), atol=1e-3)


def test_neo_confirms_the_blocked_trigger_of_a_toy_model_and_not_a_clean_input():
    rng = np.random.default_rng(3)
    clean = rng.uniform(0.3, 0.7, (16, 16, 3)).astype(np.float32)
    triggered = clean.copy()
    triggered[3:5, 5:7] = [1.0, 1.0, 0.0]
    confirm = jnp.asarray(rng.uniform(0.3, 0.7, (20, 16, 16, 3)).astype(np.float32))
    positions = neo.blocker_positions(16, 16, 4, 2)
    boxes = jnp.asarray(np.concatenate([positions, np.full_like(positions, 4)], axis=1), jnp.float32)
    score_fn = jax.jit(lambda image, label: neo.neo_score(
        toy_patch_logits, image, label, neo.dominant_colour(image), boxes, confirm,
        jnp.zeros(20, jnp.int32), max_candidates=4))
    score, box, transitions = score_fn(jnp.asarray(triggered), 1)
    top, left, height, width = np.asarray(box)
    assert float(score) == 1.0 and int(transitions) >= 1
    assert top <= 3 and left <= 5 and top + height >= 5 and left + width >= 7  # the box holds the patch
    score, _, transitions = score_fn(jnp.asarray(clean), 0)
    assert float(score) == 0.0 and int(transitions) == 0


def test_neo_rejects_bad_input(tiny_model, random_dataset, empty_clean_set):
    module, variables = tiny_model("small-bn")
    with pytest.raises(ValueError, match="at least 1"):
        neo.neo(module, variables, empty_clean_set, jax.random.key(0), neo.NEOConfig())
    config = neo.NEOConfig(stride=14, max_candidates=2, num_confirm=4)
    result = neo.neo(module, variables, random_dataset, jax.random.key(0), config)
    predicted, rejected = result.classifier(random_dataset.images[:4])
    assert predicted.shape == rejected.shape == (4,) and rejected.dtype == bool
    with pytest.raises(TypeError, match="uint8"):
        result.classifier(to_float(random_dataset.images[:4]))
    with pytest.raises(ValueError, match="shape"):
        neo.screen(module, variables, np.zeros((2, 16, 16, 3), np.uint8), random_dataset.images)


def test_input_filters_are_registered_detectors():
    assert defenses.get("strip").detector and defenses.get("neo").detector


# --------------------------------------------------------------------------- real data
REAL_INPUTS = 30


@pytest.fixture(scope="module")
def badnets_inputs(zoo_badnets_run, gtsrb_test):
    """30 successfully triggered and 30 clean GTSRB test images of the zoo v2 BadNets model, and
    the defender's clean set (2 per class, held out of those inputs)."""
    from conftest import optimized_compilation

    from bdjax.data import clean_defense_split
    from bdjax.evaluation import TestSets
    from bdjax.models.inference import predict

    run = zoo_badnets_run
    clean, evaluation = clean_defense_split(gtsrb_test, 2, 0)
    sets = TestSets.build(evaluation, run.attack, run.target)
    with optimized_compilation():
        hits = np.flatnonzero(predict(run.module, run.variables, sets.triggered.images) == run.target.target)

    def spread(count):  # evenly over the class-sorted set, so every class is represented
        return np.linspace(0, count - 1, REAL_INPUTS).round().astype(int)

    return run, clean, sets.triggered.images[hits[spread(len(hits))]], sets.clean.images[spread(len(sets.clean))]


def detection_rates(classifier, triggered, clean_inputs):
    _, flagged_triggered = classifier(triggered)
    _, flagged_clean = classifier(clean_inputs)
    return flagged_triggered.mean(), flagged_clean.mean()


@pytest.mark.realdata
def test_strip_flags_badnets_inputs_by_their_low_entropy(badnets_inputs):
    """STRIP as its authors' code superimposes (x + c, saturated) separates BadNets inputs at the
    15% clean-set threshold; its 0.5/0.5 blend halves the 2x2 trigger's colour, and the CETF paper
    reports STRIP weak on this attack (ResNet-20 GTSRB: ASR 55% after STRIP)."""
    run, clean, triggered, clean_inputs = badnets_inputs
    config = strip.STRIPConfig(num_overlays=50, input_weight=1.0, overlay_weight=1.0, false_positive_rate=0.15)
    result = strip.strip(run.module, run.variables, clean, jax.random.key(0), config)
    tpr, fpr = detection_rates(result.classifier, triggered, clean_inputs)
    print(f"STRIP: TPR {tpr:.2f}, FPR {fpr:.2f}, threshold {result.info['threshold']}")
    # Measured (zoo v2 model): TPR 1.0, FPR 0.27 (zoo v1: 0.20) — above the nominal 15%: the threshold
    # is a quantile of only 86 clean entropies (experiments/results/cetf_tables.md: FPR 0.07 on more inputs).
    assert tpr >= 0.8 and fpr <= 0.35, (tpr, fpr, result.info["threshold"])


@pytest.mark.realdata
def test_neo_flags_badnets_inputs_and_finds_the_trigger_corner(badnets_inputs):
    """NEO confirms the blocked upper-left trigger on triggered inputs and almost never on clean
    ones. Smaller search than the defaults (stride 4, 4 candidates) to fit the test budget."""
    run, clean, triggered, clean_inputs = badnets_inputs
    config = neo.NEOConfig(stride=4, max_candidates=4)
    confirm = neo.confirmation_set(clean, jax.random.key(0), config)
    found = neo.screen(run.module, run.variables, np.concatenate([triggered, clean_inputs]), confirm, config)
    n = len(triggered)
    tpr, fpr = found.poisoned[:n].mean(), found.poisoned[n:].mean()
    print(f"NEO: TPR {tpr:.2f}, FPR {fpr:.2f}")
    # Measured (zoo v2 model, as on zoo v1): TPR 1.0, FPR 0.0.
    assert tpr >= 0.8 and fpr <= 0.15, (tpr, fpr, found.score.tolist())
    boxes = found.box[:n][found.poisoned[:n]]
    assert np.all((boxes[:, 0] == 0) & (boxes[:, 1] == 0)), boxes.tolist()  # the trigger sits at (0, 0)
