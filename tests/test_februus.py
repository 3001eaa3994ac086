"""Februus (Doan et al., ACSAC 2020) as its paper claims it: removing the Grad-CAM region of an
input and inpainting it with a generator trained on clean images only lowers the ASR of a
patch backdoor while clean inputs keep most of their accuracy; no input is rejected."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import checkpoint, defenses
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses import februus

TINY = februus.InpainterConfig(features=4, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def tiny_inpainter(random_dataset):
    module, variables, losses = februus.train_inpainter(random_dataset.images[:8], jax.random.key(0), TINY)
    return module, variables, losses


# --------------------------------------------------------------------------- the pieces
def test_the_inpainter_repaints_only_the_removed_pixels(tiny_inpainter, random_dataset):
    module, variables, losses = tiny_inpainter
    assert losses.shape == (TINY.steps,) and np.all(np.isfinite(losses))
    fill = np.asarray(variables["stats"]["fill"])
    np.testing.assert_allclose(fill, to_float(random_dataset.images[:8]).mean(axis=(0, 1, 2)), rtol=1e-5)
    images = jnp.asarray(to_float(random_dataset.images[:3]))
    masks = jnp.zeros((3, 32, 32, 1)).at[:, 4:12, 20:30].set(1.0)
    out = np.asarray(module.apply(variables, images, masks))
    assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    keep = np.broadcast_to(np.asarray(masks) == 0, out.shape)
    np.testing.assert_array_equal(out[keep], np.asarray(images)[keep])
    # The generator never sees what was under the mask: changing it changes nothing.
    scribbled = images.at[:, 4:12, 20:30].set(1.0)
    np.testing.assert_allclose(module.apply(variables, scribbled, masks), out, atol=1e-6)


def test_training_masks_are_binary_rectangles_and_cam_blobs():
    config = februus.InpainterConfig(max_rectangle=0.25)
    rectangles = np.asarray(februus.rectangle_masks(jax.random.key(0), 64, 32, 32, config.max_rectangle))
    assert rectangles.shape == (64, 32, 32, 1) and set(np.unique(rectangles)) <= {0.0, 1.0}
    for mask in rectangles[..., 0]:
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 2 <= height <= 8 and 2 <= width <= 8 and mask.sum() == height * width  # one filled box
    blobs = np.asarray(februus.cam_blob_masks(jax.random.key(1), 64, 32, 32, threshold=0.7))
    assert blobs.shape == (64, 32, 32, 1) and set(np.unique(blobs)) <= {0.0, 1.0}
    assert np.all(blobs.sum(axis=(1, 2, 3)) >= 1)  # the map's maximum is always removed
    assert 0.02 < blobs.mean() < 0.5
    mixed = np.asarray(februus.training_masks(jax.random.key(2), 64, 32, 32, config))
    assert mixed.shape == (64, 32, 32, 1)


def test_a_saved_inpainter_loads_and_paints_the_same(tiny_inpainter, random_dataset, tmp_path):
    module, variables, _ = tiny_inpainter
    path = februus.save_inpainter(tmp_path / "inpainter.npz", module, variables)
    loaded_module, loaded = februus.load_inpainter(path)
    assert loaded_module == module
    images = jnp.asarray(to_float(random_dataset.images[:2]))
    masks = jnp.zeros((2, 32, 32, 1)).at[:, :6, :6].set(1.0)
    np.testing.assert_array_equal(loaded_module.apply(loaded, images, masks), module.apply(variables, images, masks))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a Februus inpainter"):
        februus.load_inpainter(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable inpainter"):
        februus.load_inpainter(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        februus.load_inpainter(tmp_path / "missing.npz")


def test_februus_purifies_and_rejects_nothing(tiny_model, random_dataset, tmp_path):
    module, variables = tiny_model("small-bn")
    config = februus.FebruusConfig(inpainter=TINY, inpainter_out=str(tmp_path / "g.npz"), batch_size=4)
    result = defenses.get("februus").fn(module, variables, random_dataset, jax.random.key(0), config)
    predicted, rejected = result.classifier(random_dataset.images[:6])
    assert predicted.shape == rejected.shape == (6,) and rejected.dtype == bool and not rejected.any()
    assert result.info["screened"][0]["count"] == 6 and 0.0 < result.info["screened"][0]["removed_mean"] < 1.0
    assert (tmp_path / "g.npz").is_file() and result.info["inpainter_trained_on"] == len(random_dataset)
    # The saved generator is used as it is: the same purified predictions, no clean set needed.
    reuse = februus.FebruusConfig(inpainter_file=str(tmp_path / "g.npz"), batch_size=4)
    empty = Dataset(np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32), random_dataset.info)
    again = februus.februus(module, variables, empty, jax.random.key(1), reuse)
    np.testing.assert_array_equal(again.classifier(random_dataset.images[:6])[0], predicted)
    assert defenses.get("februus").detector and defenses.get("februus").kind == "input filter"


def test_februus_refuses_bad_input_naming_the_problem(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    empty = Dataset(np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32), random_dataset.info)
    with pytest.raises(ValueError, match="clean set is empty"):
        februus.februus(module, variables, empty, jax.random.key(0), februus.FebruusConfig(inpainter=TINY))
    with pytest.raises(ValueError, match="at least 1 clean image"):
        februus.train_inpainter(np.zeros((0, 32, 32, 3), np.uint8), jax.random.key(0), TINY)
    with pytest.raises(ValueError, match="uint8 images"):
        februus.train_inpainter(np.zeros((2, 32, 32, 3), np.float32), jax.random.key(0), TINY)
    with pytest.raises(ValueError, match="cam_threshold"):
        februus.februus(module, variables, random_dataset, jax.random.key(0),
                        februus.FebruusConfig(cam_threshold=0.0, inpainter=TINY))
    with pytest.raises(FileNotFoundError, match="inpainter file"):
        februus.februus(module, variables, random_dataset, jax.random.key(0),
                        februus.FebruusConfig(inpainter_file="/nonexistent/g.npz"))
    result = februus.februus(module, variables, random_dataset, jax.random.key(0),
                             februus.FebruusConfig(inpainter=TINY, batch_size=4))
    with pytest.raises(TypeError, match="uint8"):
        result.classifier(to_float(random_dataset.images[:2]))
    with pytest.raises(ValueError, match="shape"):
        result.classifier(random_dataset.images[0])  # one image, not a batch
    with pytest.raises(ValueError, match="shape"):
        result.classifier(np.zeros((2, 28, 28, 3), np.uint8))
    predicted, rejected = result.classifier(np.zeros((0, 32, 32, 3), np.uint8))
    assert predicted.shape == rejected.shape == (0,)


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_februus_lowers_badnets_asr_and_keeps_most_clean_accuracy(zoo_badnets_run, gtsrb_test):
    """Zoo v2's medium-bn BadNets model (2x2 upper-left patch), Februus at the official code's
    CIFAR-10 threshold 0.7 (its GTSRB script's 0.8, the library's GTSRB default, leaves ASR 0.70
    on this model: measured with the 1,000-step generator) with a generator trained briefly (80 steps) on the defender's 86 clean images,
    on 40 triggered and 40 clean held-out inputs. The model's last conv map is 2x2, so the
    removed region is coarse (about 30% of the image) and still misses the small trigger on
    about half the inputs (its map value there is often 0.5-0.7): a partial removal, not the
    paper's near-zero ASR, which it reports for larger triggers."""
    from bdjax.data import clean_defense_split
    from bdjax.evaluation import TestSets

    run = zoo_badnets_run
    clean, evaluation = clean_defense_split(gtsrb_test, 2, 0)
    sets = TestSets.build(evaluation, run.attack, run.target)
    triggered = sets.triggered.images[np.linspace(0, len(sets.triggered) - 1, 40).round().astype(int)]
    chosen = np.linspace(0, len(sets.clean) - 1, 40).round().astype(int)
    clean_inputs, labels = sets.clean.images[chosen], sets.clean.labels[chosen]
    started = time.perf_counter()
    config = februus.FebruusConfig(cam_threshold=0.7,
                                   inpainter=februus.InpainterConfig(features=16, steps=80, batch_size=16))
    result = februus.februus(run.module, run.variables, clean, jax.random.key(0), config)
    on_triggered, on_clean = februus.purify(run.module, run.variables, result.info["inpainter"],
                                            np.concatenate([triggered, clean_inputs]), config).split(len(triggered))
    seconds = time.perf_counter() - started
    asr_before, asr_after = np.mean(on_triggered.original == run.target.target), np.mean(on_triggered.predicted == run.target.target)
    acc_before, acc_after = np.mean(on_clean.original == labels), np.mean(on_clean.predicted == labels)
    print(f"Februus: ASR {asr_before:.3f} -> {asr_after:.3f}, ACC {acc_before:.3f} -> {acc_after:.3f}, "
          f"removed {on_triggered.removed.mean():.2f} / {on_clean.removed.mean():.2f}, {seconds:.1f} s")
    # Measured: ASR 1.000 -> 0.450, ACC 0.950 -> 0.825, 31% / 27% of the pixels removed, 13 s.
    # The default 1,000-step generator (220 s) restores more: ACC 0.875, the same ASR.
    assert asr_before >= 0.95 and asr_after <= asr_before - 0.3, (asr_before, asr_after)
    assert acc_after >= acc_before - 0.2, (acc_before, acc_after)


@pytest.mark.realdata
def test_februus_removes_a_patch_away_from_the_border_at_the_library_defaults(gtsrb_test):
    """Zoo v2's diagnostic resnet20-gtsrb-badnets-inner (CETF's 2x2 yellow patch 8 px in from the
    bottom-right corner; ACC 0.972 / ASR 1.000), Februus at the library's GTSRB defaults (threshold
    0.8, Grad-CAM on the last residual block) with a generator trained briefly (80 steps) on the
    defender's 86 clean images: Grad-CAM covers the whole patch, so the backdoor is gone. (The same
    patch in a corner is missed: experiments/results/cetf_tables_v2.md, ASR 1.00 on the bottom-right
    model.)"""
    from bdjax.data import clean_defense_split
    from bdjax.evaluation import TestSets

    run = checkpoint.load(Path(__file__).resolve().parents[1] / "experiments" / "zoo-v2" /
                          "resnet20-gtsrb-badnets-inner")
    clean, evaluation = clean_defense_split(gtsrb_test, 2, 0)
    sets = TestSets.build(evaluation, run.attack, run.target)
    triggered = sets.triggered.images[np.linspace(0, len(sets.triggered) - 1, 40).round().astype(int)]
    config = februus.FebruusConfig(inpainter=februus.InpainterConfig(features=16, steps=80, batch_size=16))
    result = februus.februus(run.module, run.variables, clean, jax.random.key(0), config)
    found = februus.purify(run.module, run.variables, result.info["inpainter"], triggered,
                           februus.resolved(config, "gtsrb"))
    asr_before, asr_after = (np.mean(found.original == run.target.target),
                             np.mean(found.predicted == run.target.target))
    print(f"Februus on the inner patch: ASR {asr_before:.3f} -> {asr_after:.3f}, removed {found.removed.mean():.3f}")
    assert result.info["cam_threshold"] == 0.8
    assert asr_before >= 0.95 and asr_after <= 0.1, (asr_before, asr_after)
