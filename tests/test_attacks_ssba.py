"""SSBA: a StegaStamp encoder trained on clean images hides a secret in every image; the
residual is a small, sample-specific trigger that plants a backdoor (Li et al., ICCV 2021).

Fast tests use an initialised (untrained) encoder 4 wide. The real-data tests train an encoder
briefly on 2,000 stratified GTSRB training images (the command line's training, 8 wide, 400
steps instead of 1,500) and plant it as the LF test does: Small-BN, Adam 3e-3, batch 64, no
augmentation, 6 epochs (LF: 4) at 10% poison, 1,000 test images.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import checkpoint, models
from bdjax.attacks import SSBA, SSBAEncoderConfig, TargetMap, from_record, make, poison_training_set
from bdjax.attacks import ssba_encoder
from bdjax.attacks.ssba import Encoder, load_encoder, psnr
from bdjax.data import load, stratified_subset
from bdjax.data.dataset import to_float
from bdjax.evaluation import TestSets, evaluate_model
from bdjax.training import TrainConfig, train

TARGET = 14
SHAPE = (32, 32, 3)
TRAIN = TrainConfig(epochs=6, batch_size=64, optimizer="adam", learning_rate=3e-3, crop_padding=0)
BRIEF = ["--steps", "400", "--secret-only-steps", "100", "--l2-ramp", "200", "--channels", "8"]


@pytest.fixture(scope="module")
def untrained_encoder():
    """{"params": ...} of an initialised Encoder 4 wide, for a 20-bit secret."""
    return dict(Encoder(4).init(jax.random.key(0), jnp.zeros((1, 20), jnp.float32), jnp.zeros((1, *SHAPE))))


@pytest.fixture(scope="module")
def gtsrb_small(data_dir):
    """(2,000 stratified training images, 1,000 test images, the all-to-one target map)."""
    train_set = stratified_subset(load("gtsrb", "train", data_dir), 2000, jax.random.key(0))
    test_set = stratified_subset(load("gtsrb", "test", data_dir), 1000, jax.random.key(1))
    return train_set, test_set, TargetMap("all_to_one", TARGET, train_set.info.num_classes)


@pytest.fixture(scope="module")
def encoder_file(gtsrb_small, data_dir, tmp_path_factory):
    """An encoder trained briefly by the command line on the 2,000 training images."""
    path = tmp_path_factory.mktemp("ssba") / "ssba-gtsrb.npz"
    assert ssba_encoder.main(["--dataset", "gtsrb", "--out", str(path), "--clean-images", "2000", "--quiet",
                              "--data-dir", data_dir, *BRIEF]) == 0
    return path


# --------------------------------------------------------------------------- fast

def test_ssba_refuses_a_missing_corrupt_or_mismatched_encoder(tmp_path, untrained_encoder):
    with pytest.raises(ValueError, match="python -m bdjax.attacks.ssba_encoder"):
        make("ssba", jax.random.key(0), SHAPE)
    with pytest.raises(ValueError, match="does not exist"):
        make("ssba", jax.random.key(0), SHAPE, encoder_file=str(tmp_path / "none.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not an .npz file"):
        make("ssba", jax.random.key(0), SHAPE, encoder_file=str(tmp_path / "corrupt.npz"))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="holds no SSBA encoder"):
        make("ssba", jax.random.key(0), SHAPE, encoder_file=str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match=r"trained for other images than \(64, 64, 3\)"):
        make("ssba", jax.random.key(0), (64, 64, 3), encoder=untrained_encoder)
    with pytest.raises(ValueError, match="divisible by 8"):
        make("ssba", jax.random.key(0), (28, 28, 3), encoder=untrained_encoder)
    with pytest.raises(ValueError, match="bdjax.attacks.ssba.Encoder"):
        make("ssba", jax.random.key(0), SHAPE, encoder={"params": {}})
    with pytest.raises(ValueError, match="secret_bits"):
        SSBAEncoderConfig(secret_bits=0)


def test_ssba_rejects_images_of_another_shape(untrained_encoder):
    attack = make("ssba", jax.random.key(0), SHAPE, encoder=untrained_encoder)
    with pytest.raises(ValueError, match=r"built for \(32, 32, 3\)"):
        attack.apply(jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        attack.apply(jnp.zeros((32, 32)))
    with pytest.raises(TypeError, match="float pixels"):
        attack.apply(np.zeros((2, *SHAPE), np.uint8))


def test_ssba_trigger_is_a_pure_jittable_serialisable_function(untrained_encoder, uint8_images):
    """Same input, same output (jitted or not, one image or a batch); the key draws the secret;
    to_record -> JSON -> from_record gives the identical trigger."""
    attack = make("ssba", jax.random.key(0), SHAPE, encoder=untrained_encoder)
    images = jnp.asarray(to_float(uint8_images))
    with jax.numpy_dtype_promotion("strict"):
        jitted = np.asarray(jax.jit(lambda a, x: a.apply(x))(attack, images))
        eager = np.asarray(attack.apply(images))
        one = np.asarray(jax.jit(lambda a, x: a.apply(x))(attack, images[2]))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    np.testing.assert_allclose(one, jitted[2], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, x: a.apply(x))(attack, images)), jitted)
    assert jitted.min() >= 0.0 and jitted.max() <= 1.0 and not np.array_equal(jitted, images)

    again = make("ssba", jax.random.key(0), SHAPE, encoder=untrained_encoder)
    other = make("ssba", jax.random.key(1), SHAPE, encoder=untrained_encoder)
    np.testing.assert_array_equal(np.asarray(again.secret), np.asarray(attack.secret))
    assert not np.array_equal(np.asarray(other.secret), np.asarray(attack.secret))

    meta, arrays = attack.to_record()
    assert meta["channels"] == 4 and "encoder/params/conv1/kernel" in arrays and arrays["secret"].shape == (20,)
    restored = from_record(json.loads(json.dumps(meta)), arrays)
    assert isinstance(restored, SSBA) and restored.image_shape == SHAPE
    np.testing.assert_array_equal(restored.apply_uint8(uint8_images), attack.apply_uint8(uint8_images))


# --------------------------------------------------------------------------- real data

@pytest.mark.realdata
@pytest.mark.slow
def test_ssba_encoder_hides_the_secret_in_a_small_sample_specific_residual(encoder_file, gtsrb_small):
    """The briefly trained encoder: file loads, residuals differ between images (one of each of 16
    classes), PSNR > 25 dB."""
    _, test_set, _ = gtsrb_small
    _, config = load_encoder(encoder_file)
    assert config.channels == 8 and config.steps == 400
    with np.load(encoder_file) as data:
        print(f"SSBA encoder: bit accuracy {float(data['bit_accuracy']):.3f}, PSNR {float(data['psnr']):.1f} dB")
        assert float(data["bit_accuracy"]) > 0.9
    attack = make("ssba", jax.random.key(0), SHAPE, encoder_file=str(encoder_file))
    one_per_class = [int(np.flatnonzero(test_set.labels == c)[0]) for c in range(16)]
    images = jnp.asarray(to_float(test_set.images[one_per_class]))
    residuals = np.asarray(jax.jit(lambda a, x: a.residuals(x))(attack, images))
    spread = np.abs(residuals[:, None] - residuals[None]).mean(axis=(2, 3, 4))  # [16, 16] between images
    off_diagonal = spread[~np.eye(16, dtype=bool)]
    # Typically as far apart as the residuals are large (two near-black images may share one).
    assert np.median(off_diagonal) > 0.5 * np.abs(residuals).mean(), "the trigger hardly depends on the image"
    triggered = jax.jit(lambda a, x: a.apply(x))(attack, images)
    assert float(jnp.min(psnr(images, triggered))) > 20.0 and float(jnp.mean(psnr(images, triggered))) > 25.0


@pytest.mark.realdata
@pytest.mark.slow
def test_ssba_plants_a_backdoor_that_survives_saving(encoder_file, gtsrb_small, tmp_path):
    """The encoder's residual on 10% of the training images gives ASR > 0.8 with ACC > 0.55; the
    run saves the encoder and the secret, and a defense-side load applies the same trigger."""
    train_set, test_set, target = gtsrb_small
    attack = make("ssba", jax.random.key(0), SHAPE, encoder_file=str(encoder_file))
    poisoned = poison_training_set(train_set, attack, target, jax.random.key(2), rate=0.1)
    module = models.create("small-bn", train_set.info)
    variables = train(module, poisoned.dataset, TRAIN, jax.random.key(3), progress=False).variables
    report = evaluate_model(module, variables, TestSets.build(test_set, attack, target))
    print(f"SSBA: ACC {report.acc:.3f} ASR {report.asr:.3f}")
    assert report.asr > 0.8 and report.acc > 0.55, report

    record = {"dataset": "gtsrb", "model": "small-bn", "metrics": report.to_dict()}
    checkpoint.save(tmp_path / "run", variables, record, attack, target)
    encoder_file.rename(encoder_file.with_suffix(".moved"))  # the run needs no file
    try:
        run = checkpoint.load(tmp_path / "run")
    finally:
        encoder_file.with_suffix(".moved").rename(encoder_file)
    assert isinstance(run.attack, SSBA) and run.attack.source == str(encoder_file)
    images = test_set.images[:16]
    np.testing.assert_array_equal(run.attack.apply_uint8(images), attack.apply_uint8(images))
