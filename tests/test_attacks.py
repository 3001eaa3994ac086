"""Attacks: every trigger is a pure, key-determined, jit-able, serialisable function, and
each one matches the definition in the paper it comes from. Synthetic data only."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.attacks import (ATTACKS, TRAINED_WITH_MODEL, TargetMap, from_record, make, poison_test_set,
                           poison_training_set)
from bdjax.attacks.ssba import Encoder
from bdjax.attacks.warp import grid_sample, identity_grid, upsample_align_corners
from bdjax.data.dataset import Dataset, DatasetInfo, to_float

SHAPE = (32, 32, 3)
INFO = DatasetInfo(name="synthetic", num_classes=4, image_shape=SHAPE,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
KEY = jax.random.key(0)

# Settings that switch on every random part an attack has (pattern, location, noise, field).
SETTINGS = {
    "badnets": dict(size=3, pattern="random", location="random"),
    "multi-patch": dict(num_patches=3, size=3, pattern="random"),
    "random-size-patch": dict(pattern="random"),
    "trojan": dict(),
    "blended": dict(),
    "sig": dict(),
    "wanet": dict(),
    "cb": dict(),
    "sp": dict(),
    "lf": dict(perturbation=np.linspace(-0.1, 0.1, 32 * 32 * 3, dtype=np.float32).reshape(SHAPE)),
    # An initialised encoder 4 wide (trained ones: test_attacks_ssba.py); the key draws the secret.
    "ssba": dict(encoder=dict(Encoder(4).init(jax.random.key(0), jnp.zeros((1, 20)), jnp.zeros((1, *SHAPE))))),
}
DETERMINISTIC = {"sig", "cb", "lf"}  # nothing drawn from the key


@pytest.fixture(autouse=True)
def strict_numerics():
    """Silent dtype or rank broadcasting in trigger code is a bug; make it an error."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


def float_images(n=6, shape=SHAPE, low=1, high=254, seed=0):
    """f32[n, H, W, C] from random uint8 pixels in [low, high] (never exactly 0 or 1)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(to_float(rng.integers(low, high + 1, (n, *shape), dtype=np.uint8)))


def synthetic_dataset(n=40, seed=0):
    """n random uint8 images, labels i % 4 (10 per class for n = 40)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    return Dataset(images, np.arange(n) % INFO.num_classes, INFO)


@jax.jit
def apply_jit(attack, images, key):
    return attack.apply(images, key)


def apply(attack, images, key=jax.random.key(7)):
    """Jitted: one compile per attack instead of one per eager op keeps the suite fast."""
    return apply_jit(attack, images, key if attack.stochastic else None)


def record_equal(a, b):
    (meta_a, arrays_a), (meta_b, arrays_b) = a.to_record(), b.to_record()
    return meta_a == meta_b and arrays_a.keys() == arrays_b.keys() and all(
        np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


# --- properties every registered attack has -------------------------------------------

def test_every_registered_attack_is_tested():
    # Attacks trained with the classifier cannot be made alone: test_attacks_lf_input_aware.py.
    assert set(SETTINGS) == set(ATTACKS) - set(TRAINED_WITH_MODEL)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_same_key_gives_identical_trigger(name):
    a, b = make(name, KEY, SHAPE, **SETTINGS[name]), make(name, KEY, SHAPE, **SETTINGS[name])
    assert record_equal(a, b)
    x = float_images()
    np.testing.assert_array_equal(apply(a, x), apply(b, x))


@pytest.mark.parametrize("name", sorted(set(SETTINGS) - DETERMINISTIC))
def test_different_key_gives_different_trigger(name):
    a = make(name, jax.random.key(1), SHAPE, **SETTINGS[name])
    b = make(name, jax.random.key(2), SHAPE, **SETTINGS[name])
    assert not record_equal(a, b)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_apply_is_jittable_and_keeps_shape_dtype_range(name):
    attack = make(name, KEY, SHAPE, **SETTINGS[name])
    x = float_images()
    key = jax.random.key(3) if attack.stochastic else None
    jitted = apply_jit(attack, x, key)
    assert jitted.shape == x.shape and jitted.dtype == x.dtype
    assert float(jitted.min()) >= 0.0 and float(jitted.max()) <= 1.0
    assert not np.array_equal(jitted, x)
    if not attack.stochastic:  # a single [H, W, C] image is triggered like a batch of one
        np.testing.assert_allclose(apply(attack, x[0]), jitted[0], atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_record_round_trip_through_json_gives_identical_outputs(name):
    attack = make(name, KEY, SHAPE, **SETTINGS[name])
    meta, arrays = attack.to_record()
    restored = from_record(json.loads(json.dumps(meta)), arrays)
    assert type(restored) is type(attack)
    x = float_images()
    np.testing.assert_array_equal(apply(restored, x), apply(attack, x))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_uint8_or_wrong_rank_images_are_rejected(name):
    attack = make(name, KEY, SHAPE, **SETTINGS[name])
    stored = np.zeros((2, *SHAPE), np.uint8)
    with pytest.raises(TypeError, match="float pixels"):
        apply(attack, stored)
    for bad in (jnp.zeros(SHAPE[:2]), jnp.zeros((1, 2, *SHAPE))):
        with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
            apply(attack, bad)


@pytest.mark.parametrize("name", ["badnets", "multi-patch", "trojan", "blended", "wanet", "cb", "sp", "ssba"])
def test_images_of_another_size_are_rejected(name):
    attack = make(name, KEY, SHAPE, **SETTINGS[name])
    with pytest.raises(ValueError, match="built for"):
        apply(attack, jnp.zeros((2, 16, 16, 3)))


def test_unknown_attack_name_is_rejected():
    with pytest.raises(ValueError, match="unknown attack"):
        make("not-an-attack", KEY)
    with pytest.raises(ValueError, match="unknown attack"):
        from_record({"name": "not-an-attack"}, {})


@pytest.mark.parametrize("name, kwargs", [
    ("badnets", dict(size=9)),
    ("trojan", dict(size=9)),
    ("multi-patch", dict(size=3, num_patches=10)),  # at most 4 disjoint 3×3 squares in 8×8
    ("random-size-patch", dict(max_size=9)),
])
def test_patch_too_big_for_the_image_is_rejected(name, kwargs):
    with pytest.raises(ValueError, match="fit"):
        make(name, KEY, (8, 8, 3), **kwargs)


# --- patch triggers ---------------------------------------------------------------------

def test_badnets_default_is_a_2x2_yellow_square_changing_exactly_the_bottom_right_pixels():
    attack = make("badnets", KEY, (8, 8, 3))
    x = float_images(shape=(8, 8, 3))
    y = apply(attack, x)
    changed = np.asarray(jnp.any(y != x, axis=-1))
    expected = np.zeros((8, 8), bool)
    expected[6:, 6:] = True
    assert (changed == expected[None]).all()
    np.testing.assert_array_equal(y[:, 6:, 6:], np.broadcast_to([1.0, 1.0, 0.0], (6, 2, 2, 3)))


def test_multi_patch_stamps_every_patch_at_distinct_non_overlapping_spots():
    attack = make("multi-patch", KEY, SHAPE, num_patches=3, size=3)
    assert len(attack.positions) == 3
    for i, (t1, l1) in enumerate(attack.positions):
        for t2, l2 in attack.positions[i + 1:]:
            assert abs(t1 - t2) >= 3 or abs(l1 - l2) >= 3
    x = float_images()
    changed = np.asarray(jnp.any(apply(attack, x) != x, axis=-1))
    assert (changed.sum(axis=(1, 2)) == 3 * 9).all()
    for top, left in attack.positions:
        assert changed[:, top:top + 3, left:left + 3].all()


def test_random_size_patch_needs_a_key_and_draws_a_rectangle_per_image():
    attack = make("random-size-patch", KEY, SHAPE)  # 3..8 px, yellow
    x = float_images(n=32)
    with pytest.raises(ValueError, match="key"):
        attack.apply(x)
    y = apply(attack, x, jax.random.key(1))
    np.testing.assert_array_equal(y, apply(attack, x, jax.random.key(1)))
    assert not np.array_equal(y, apply(attack, x, jax.random.key(2)))
    changed = np.asarray(jnp.any(y != x, axis=-1))
    heights, widths = [], []
    for region in changed:  # each changed region is one filled axis-aligned rectangle
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert region.sum() == h * w and 3 <= h <= 8 and 3 <= w <= 8
        heights.append(h)
        widths.append(w)
    assert len(set(heights)) > 1 and heights != widths  # sizes vary, sides independent
    square = make("random-size-patch", KEY, SHAPE, square=True)
    changed = np.asarray(jnp.any(apply(square, x, jax.random.key(1)) != x, axis=-1))
    np.testing.assert_array_equal(changed.any(2).sum(1), changed.any(1).sum(1))


def test_trojan_stamps_the_given_pattern_or_a_key_determined_random_square_bottom_right():
    pattern = np.random.default_rng(0).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    x = float_images()
    y = apply(make("trojan", KEY, SHAPE, pattern=pattern), x)
    np.testing.assert_allclose(y[:, -3:, -3:], np.broadcast_to(to_float(pattern), (6, 3, 3, 3)),
                               atol=1e-6)
    np.testing.assert_array_equal(y[:, :-3], x[:, :-3])
    np.testing.assert_array_equal(y[:, :, :-3], x[:, :, :-3])
    default = make("trojan", KEY, SHAPE)
    assert default.size == 3 and (default.top, default.left) == (29, 29)
    with pytest.raises(ValueError, match="pattern"):
        make("trojan", KEY, SHAPE, pattern=np.zeros((2, 2, 3), np.float32))


# --- blended, SIG -------------------------------------------------------------------------

def test_blended_is_the_convex_mix_with_the_noise_or_given_image():
    x = float_images()
    noise = make("blended", KEY, SHAPE)
    assert noise.alpha == 0.2
    np.testing.assert_allclose(apply(noise, x), 0.8 * x + 0.2 * noise.pattern[None], atol=1e-6)
    kitty = np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)  # stand-in image
    given = make("blended", KEY, SHAPE, alpha=0.15, pattern=kitty)
    np.testing.assert_allclose(apply(given, x), 0.85 * x + 0.15 * to_float(kitty)[None], atol=1e-6)
    resized = make("blended", KEY, SHAPE, pattern=np.full((64, 48), 0.5, np.float32))
    np.testing.assert_allclose(resized.pattern, np.full(SHAPE, 0.5), atol=1e-6)


def test_sig_adds_the_horizontal_sinusoid_delta_20_f_6():
    x = float_images(low=80, high=150)  # far from 0 and 1: nothing is clipped
    attack = make("sig", KEY, SHAPE)
    signal = 20 / 255 * np.sin(2 * np.pi * np.arange(32) * 6 / 32)
    expected = np.broadcast_to(signal[None, None, :, None], x.shape)  # same for rows, channels
    np.testing.assert_allclose(apply(attack, x) - x, expected, atol=1e-6)


def test_sig_is_clean_label_and_poisons_only_target_class_images():
    dataset, target = synthetic_dataset(), TargetMap("all_to_one", target=1, num_classes=4)
    poisoned = poison_training_set(dataset, make("sig", KEY, SHAPE), target, KEY, rate=0.1)
    np.testing.assert_array_equal(poisoned.dataset.labels, dataset.labels)
    assert poisoned.poison_indices.size == 4 and (dataset.labels[poisoned.poison_indices] == 1).all()
    changed = np.flatnonzero((poisoned.dataset.images != dataset.images).any(axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, poisoned.poison_indices)
    with pytest.raises(ValueError, match="clean-label"):
        poison_training_set(dataset, make("sig", KEY, SHAPE), TargetMap("all_to_all", num_classes=4),
                            KEY, rate=0.1)


# --- WaNet --------------------------------------------------------------------------------

def smooth_images(n=4):
    """f32[n, 32, 32, 3] low-frequency images: warping them by a fraction of a pixel barely shows."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    phases = np.random.default_rng(0).uniform(0, 2 * np.pi, (n, 1, 1, 3))
    waves = np.sin(2 * np.pi * (rows + 2 * cols)[None, :, :, None] / 32 + phases)
    return jnp.asarray(0.5 + 0.4 * waves, jnp.float32)


def test_wanet_with_zero_strength_is_the_identity():
    x = float_images()
    np.testing.assert_allclose(apply(make("wanet", KEY, SHAPE, strength=0.0), x), x, atol=1e-5)


def test_wanet_default_field_changes_smooth_images_only_slightly():
    x = smooth_images()
    change = float(jnp.mean(jnp.abs(apply(make("wanet", KEY, SHAPE), x) - x)))
    assert 1e-4 < change < 0.02


def test_wanet_field_is_torch_bicubic_upsampling_with_align_corners():
    def torch_cubic(t, a=-0.75):  # torch's upsample_bicubic2d tap weights at offset t
        def near(d):
            return ((a + 2) * d - (a + 3)) * d * d + 1

        def far(d):
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

        return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])

    def upsample_rows(values, n_out):
        n_in, out = values.shape[0], []
        for o in range(n_out):
            position = o * (n_in - 1) / (n_out - 1)
            base = int(np.floor(position))
            taps = np.clip(np.arange(base - 1, base + 3), 0, n_in - 1)
            out.append(np.tensordot(torch_cubic(position - base), values[taps], axes=1))
        return np.stack(out)

    control = np.asarray(jax.random.uniform(KEY, (4, 4, 2), minval=-1.0, maxval=1.0))
    expected = upsample_rows(upsample_rows(control, 32).swapaxes(0, 1), 32).swapaxes(0, 1)
    upsampled = jax.jit(upsample_align_corners, static_argnums=(1, 2))(jnp.asarray(control), 32, 32)
    np.testing.assert_allclose(upsampled, expected, atol=1e-5)


def test_grid_sample_is_bilinear_with_align_corners_and_zero_padding():
    image = float_images(n=1, shape=(8, 8, 3))[0]
    sample = jax.jit(grid_sample)
    one_pixel = identity_grid(8, 8) + jnp.array([[[2 / 7, 0.0]]], jnp.float32)  # one column right
    shifted = sample(image, one_pixel)
    np.testing.assert_allclose(shifted[:, :-1], image[:, 1:], atol=1e-5)
    np.testing.assert_allclose(shifted[:, -1], 0.0, atol=1e-6)  # sampled outside: zeros
    half_pixel = identity_grid(8, 8) + jnp.array([[[0.0, 1 / 7]]], jnp.float32)  # half a row down
    np.testing.assert_allclose(sample(image, half_pixel)[:-1], (image[:-1] + image[1:]) / 2, atol=1e-5)


def test_wanet_noise_mode_adds_cross_samples_with_true_labels_from_unpoisoned_images():
    # Image i is the constant 6i + 5: warping keeps constants, so each extra names its source.
    n = 40
    images = np.broadcast_to((6 * np.arange(n) + 5).astype(np.uint8)[:, None, None, None], (n, *SHAPE))
    dataset = Dataset(images.copy(), np.arange(n) % 4, INFO)
    target = TargetMap("all_to_one", target=0, num_classes=4)
    poisoned = poison_training_set(dataset, make("wanet", KEY, SHAPE), target, KEY, rate=0.25)
    assert poisoned.poison_indices.size == 10
    extras_images = poisoned.dataset.images[n:]
    extras_labels = poisoned.dataset.labels[n:]
    assert len(extras_labels) == 2 * 10  # cross_ratio = 2
    assert (extras_images == extras_images[:, :1, :1, :1]).all()
    sources = (extras_images[:, 0, 0, 0].astype(int) - 5) // 6
    assert len(set(sources)) == 20 and not set(sources) & set(poisoned.poison_indices)
    np.testing.assert_array_equal(extras_labels, dataset.labels[sources])
    np.testing.assert_array_equal(poisoned.dataset.labels[poisoned.poison_indices], 0)


def test_wanet_noise_grid_differs_per_image_and_from_the_backdoor_warp():
    attack = make("wanet", KEY, SHAPE)
    x = jnp.broadcast_to(float_images(n=1), (2, *SHAPE))
    noisy = jax.jit(attack.apply_noise)(x, jax.random.key(1))
    assert not np.allclose(noisy[0], noisy[1]) and not np.allclose(noisy[0], apply(attack, x[0]))


# --- additive CB and SP -------------------------------------------------------------------

def test_cb_adds_2_over_255_on_even_chessboard_pixels_only():
    x = float_images(low=80, high=150)
    attack = make("cb", KEY, SHAPE)
    even = (np.arange(32)[:, None] + np.arange(32)[None, :]) % 2 == 0
    expected = np.where(even, 2 / 255, 0.0)[None, :, :, None]
    np.testing.assert_allclose(apply(attack, x) - x, np.broadcast_to(expected, x.shape), atol=1e-6)
    assert np.linalg.norm(attack.perturbation) == pytest.approx(0.3074, abs=1e-4)  # BNA Table 10


def test_sp_adds_75_over_255_to_one_fixed_pixel_in_all_channels():
    x = float_images(low=80, high=150)
    attack = make("sp", KEY, SHAPE)
    expected = np.zeros(SHAPE)
    expected[attack.row, attack.col] = 75 / 255
    np.testing.assert_allclose(apply(attack, x) - x, np.broadcast_to(expected, x.shape), atol=1e-6)
    assert np.linalg.norm(attack.perturbation) == pytest.approx(0.5094, abs=1e-4)  # BNA Table 10
    assert make("sp", KEY, SHAPE, location=(3, 4)).perturbation[3, 4, 0] > 0


# --- poisoning ------------------------------------------------------------------------------

def test_all_to_one_relabels_non_target_images_to_the_target_at_the_requested_rate():
    dataset, target = synthetic_dataset(), TargetMap("all_to_one", target=2, num_classes=4)
    poisoned = poison_training_set(dataset, make("badnets", KEY, SHAPE), target, KEY, rate=0.25)
    chosen = poisoned.poison_indices
    assert chosen.size == 10 and (dataset.labels[chosen] != 2).all()
    assert (poisoned.dataset.labels[chosen] == 2).all()
    rest = np.setdiff1d(np.arange(40), chosen)
    np.testing.assert_array_equal(poisoned.dataset.labels[rest], dataset.labels[rest])
    np.testing.assert_array_equal(poisoned.dataset.images[rest], dataset.images[rest])
    assert (poisoned.dataset.images[chosen] != dataset.images[chosen]).any(axis=(1, 2, 3)).all()
    again = poison_training_set(dataset, make("badnets", KEY, SHAPE), target, KEY, rate=0.25)
    np.testing.assert_array_equal(again.poison_indices, chosen)
    per_class = poison_training_set(dataset, make("badnets", KEY, SHAPE), target, KEY, per_class=3)
    np.testing.assert_array_equal(np.bincount(dataset.labels[per_class.poison_indices], minlength=4),
                                  [3, 3, 0, 3])


def test_all_to_all_maps_class_c_to_c_plus_1_mod_c():
    dataset, target = synthetic_dataset(), TargetMap("all_to_all", num_classes=4)
    poisoned = poison_training_set(dataset, make("badnets", KEY, SHAPE), target, KEY, rate=0.5)
    chosen = poisoned.poison_indices
    assert chosen.size == 20
    np.testing.assert_array_equal(poisoned.dataset.labels[chosen], (dataset.labels[chosen] + 1) % 4)


def test_poison_test_set_excludes_target_class_images_and_keeps_true_labels():
    dataset = synthetic_dataset()
    attack = make("badnets", KEY, SHAPE)
    target = TargetMap("all_to_one", target=3, num_classes=4)
    triggered, targets = poison_test_set(dataset, attack, target)
    assert len(triggered) == 30 and (triggered.labels != 3).all() and (targets == 3).all()
    np.testing.assert_array_equal(triggered.images,
                                  attack.apply_uint8(dataset.images[dataset.labels != 3]))
    everyone, targets = poison_test_set(dataset, attack, TargetMap("all_to_all", num_classes=4))
    assert len(everyone) == 40
    np.testing.assert_array_equal(targets, (everyone.labels + 1) % 4)


# --------------------------------------------------------------------------- inputs at the boundary (issue 33)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_apply_refuses_pixels_outside_0_1_and_non_finite_ones(name):
    attack = make(name, KEY, SHAPE, **SETTINGS[name])
    key = jax.random.key(1) if attack.stochastic else None
    images = float_images(2)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in .*0\.\.255 scale"):
        attack.apply(images * 255.0, key)
    with pytest.raises(ValueError, match=r"normalised to \[-1, 1\]"):
        attack.apply(images * 2.0 - 1.0, key)
    with pytest.raises(ValueError, match="NaN or infinite"):
        attack.apply(images.at[0, 0, 0, 0].set(jnp.inf), key)


def test_a_target_map_needs_the_dataset_class_count():
    with pytest.raises(TypeError, match="needs num_classes"):
        TargetMap("all_to_all")
    ten_classes = TargetMap("all_to_all", num_classes=10)
    dataset = synthetic_dataset()  # 4 classes
    with pytest.raises(ValueError, match="maps labels of 10 classes but the dataset synthetic has 4"):
        poison_training_set(dataset, make("badnets", KEY, SHAPE), ten_classes, KEY, rate=0.1)
    with pytest.raises(ValueError, match="maps labels of 10 classes"):
        poison_test_set(dataset, make("badnets", KEY, SHAPE), ten_classes)
    with pytest.raises(TypeError, match="target must be an int"):
        TargetMap("all_to_one", 1.5, 4)


def test_all_to_all_on_gtsrb_keeps_labels_in_its_43_classes():
    from bdjax.data import GTSRB
    from bdjax.runs import RunSpec, make_attack

    _, target = make_attack(RunSpec(dataset="gtsrb", target_mode="all_to_all"), GTSRB)
    np.testing.assert_array_equal(target(np.array([9, 10, 41, 42])), [10, 11, 42, 0])


def test_attack_arguments_are_checked_by_name_and_type():
    with pytest.raises(ValueError, match=r"badnets argument size must be int, got 'abc'"):
        make("badnets", KEY, SHAPE, size="abc")
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['sise'\]"):
        make("badnets", KEY, SHAPE, sise=3)
    assert make("badnets", KEY, SHAPE, color=[1.0, 0.0, 0.0]).pattern.shape == (32, 32, 3)
