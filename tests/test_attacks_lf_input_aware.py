"""LF and the input-aware dynamic attack, each planted in a small model on real GTSRB images.

Small settings chosen to plant within the CPU budget (all seeds fixed): 2,000
stratified training images, Small-BN, Adam 3e-3, batch 64, no augmentation, 1,000 test images.
LF: 8 search steps of 128 images on the committed clean Medium-BN, 4 epochs at 10% poison.
Input-aware: generators 16 wide (paper 32), 1 mask pre-training epoch (paper 25), mask density
0.2 (paper 0.032) and attack rate 0.3 (paper 0.1), 5 joint epochs (paper 600): with the
paper's density and rate the trigger needs far more epochs than a test can afford (measured
here: density 0.1 / rate 0.2 gave ASR 0.63-0.86 after 6-10 epochs, 8-wide generators 0.54-0.65).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import checkpoint, models
from bdjax.attacks import (LF, InputAware, InputAwareConfig, LFSearchConfig, TargetMap, find_lf_perturbation,
                           from_record, make, poison_training_set, train_input_aware)
from bdjax.attacks import lf_trigger
from bdjax.data import load, stratified_subset
from bdjax.data.dataset import to_float
from bdjax.evaluation import TestSets, evaluate_model
from bdjax.training import TrainConfig, train

from conftest import SYNTHETIC_INFO, ZOO_DIR

TARGET = 14
TRAIN = TrainConfig(epochs=4, batch_size=64, optimizer="adam", learning_rate=3e-3, crop_padding=0)


@pytest.fixture(scope="module")
def gtsrb_small(data_dir):
    """(2,000 stratified training images, 1,000 test images, the all-to-one target map)."""
    train_set = stratified_subset(load("gtsrb", "train", data_dir), 2000, jax.random.key(0))
    test_set = stratified_subset(load("gtsrb", "test", data_dir), 1000, jax.random.key(1))
    return train_set, test_set, TargetMap("all_to_one", TARGET, train_set.info.num_classes)


def _save_and_load(tmp_path, module_name, variables, attack, target, report):
    record = {"dataset": "gtsrb", "model": module_name, "metrics": report.to_dict()}
    checkpoint.save(tmp_path / "run", variables, record, attack, target)
    return checkpoint.load(tmp_path / "run")


# --------------------------------------------------------------------------- LF

def _low_frequency_share(perturbation, cutoff: int = 3) -> float:
    """Fraction of the 2-D spectrum's energy at frequencies of at most ``cutoff`` cycles per image."""
    energy = np.abs(np.fft.fft2(perturbation, axes=(0, 1))) ** 2
    cycles = np.abs(np.fft.fftfreq(perturbation.shape[0]) * perturbation.shape[0])
    low = np.maximum(cycles[:, None], cycles[None, :]) <= cutoff
    return float(energy[low].sum() / energy.sum())


@pytest.mark.realdata
@pytest.mark.slow
def test_lf_found_on_a_clean_model_plants_a_backdoor_that_survives_saving(gtsrb_small, data_dir, tmp_path):
    """LF: a low-frequency δ found on the clean zoo Medium-BN (the command line's search), added to
    10% of the training images, gives ASR > 0.8 with ACC > 0.55; the run saves δ."""
    train_set, test_set, target = gtsrb_small
    assert lf_trigger.main(["--run", str(ZOO_DIR / "medium-bn-gtsrb-clean"), "--target", str(TARGET),
                            "--out", str(tmp_path / "lf.npy"), "--clean-images", "500", "--steps", "8",
                            "--batch-size", "128", "--data-dir", data_dir]) == 0
    delta = np.load(tmp_path / "lf.npy")
    assert delta.shape == (32, 32, 3) and np.abs(delta).max() == pytest.approx(0.1, abs=1e-5)
    assert _low_frequency_share(delta) > 0.95  # uniform noise: ~0.05

    attack = make("lf", jax.random.key(0), (32, 32, 3), perturbation_file=str(tmp_path / "lf.npy"))
    poisoned = poison_training_set(train_set, attack, target, jax.random.key(2), rate=0.1)
    module = models.create("small-bn", train_set.info)
    variables = train(module, poisoned.dataset, TRAIN, jax.random.key(3), progress=False).variables
    report = evaluate_model(module, variables, TestSets.build(test_set, attack, target))
    print(f"LF: ACC {report.acc:.3f} ASR {report.asr:.3f}")
    assert report.asr > 0.8 and report.acc > 0.55, report

    run = _save_and_load(tmp_path, "small-bn", variables, attack, target, report)
    assert isinstance(run.attack, LF) and run.attack.source == str(tmp_path / "lf.npy")
    np.testing.assert_array_equal(np.asarray(run.attack.perturbation), delta)
    again = evaluate_model(run.module, run.variables, TestSets.build(test_set, run.attack, run.target))
    assert again.asr == report.asr and again.acc == report.acc


def test_lf_refuses_a_missing_or_wrong_perturbation(tmp_path):
    with pytest.raises(ValueError, match="python -m bdjax.attacks.lf_trigger"):
        make("lf", jax.random.key(0), (32, 32, 3))
    with pytest.raises(ValueError, match="does not exist"):
        make("lf", jax.random.key(0), (32, 32, 3), perturbation_file=str(tmp_path / "none.npy"))
    np.save(tmp_path / "small.npy", np.zeros((16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(16, 16, 3\)"):
        make("lf", jax.random.key(0), (32, 32, 3), perturbation_file=str(tmp_path / "small.npy"))
    with pytest.raises(ValueError, match="finite"):
        LF.create(None, (32, 32, 3), perturbation=np.full((32, 32, 3), 2.0, np.float32))
    with pytest.raises(TypeError, match="float"):
        LF.create(None, (32, 32, 3), perturbation=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="epsilon"):
        LFSearchConfig(epsilon=0.0)


def test_lf_search_refuses_a_set_without_usable_images(tiny_model, random_dataset):
    module, variables = tiny_model("small")
    only_target = random_dataset.subset(np.flatnonzero(random_dataset.labels == 1))
    with pytest.raises(ValueError, match="no image"):
        find_lf_perturbation(module, variables, only_target, TargetMap("all_to_one", 1, 4), jax.random.key(0))


# --------------------------------------------------------------------------- input-aware

@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.heavy  # ~110 s in the suite on the 2-core CPU: `make test-heavy`
def test_input_aware_plants_a_per_input_trigger_that_survives_saving(gtsrb_small, tmp_path):
    """Classifier and generators trained together plant the backdoor (ASR > 0.45, where a
    clean model sends ~2% of inputs to the target) while the classifier learns the task (ACC >
    0.4 on 43 classes); the trigger differs between inputs; the run saves both generators and a
    defense-side load applies them.

    These settings plant a weak, unsteady backdoor: the ASR is not monotone in the epochs (the
    classifier learns the clean task and the generator chases it) and its path changes with the
    CPU's floating-point order. ACC / ASR after joint epochs 4-8, four training keys, AMD EPYC
    CPU (2026-12-06; the same call, evaluated after every epoch: experiments/draw_spread.py):
    key 0: 0.50/0.80 0.52/0.90 0.60/0.89 0.64/0.90 0.62/0.93; key 1: 0.42/0.59 0.50/0.64
    0.64/0.59 0.68/0.60 0.68/0.69; key 2: 0.36/0.90 0.51/0.69 0.53/0.81 0.59/0.73 0.61/0.73;
    key 3: 0.45/0.66 0.57/0.55 0.55/0.66 0.52/0.74 0.62/0.65. The test trains 5 epochs with key
    3; its bounds sit below every key's value at epochs 5-8 (ASR >= 0.55, ACC >= 0.50). The
    bounds were ASR > 0.8 / ACC > 0.55 after 5 epochs, set from one run on another CPU (0.605 /
    0.862), which this machine's key 3 misses (0.57 / 0.55)."""
    train_set, test_set, target = gtsrb_small
    module = models.create("small-bn", train_set.info)
    config = InputAwareConfig(channels=16, mask_epochs=1, mask_density=0.2, attack_rate=0.3)
    result = train_input_aware(module, train_set, target, jax.random.key(3), config,
                               dataclasses.replace(TRAIN, epochs=5), progress=False)
    assert [h["stage"] for h in result.history] == ["mask"] + ["joint"] * 5
    report = evaluate_model(module, result.variables, TestSets.build(test_set, result.attack, target))
    print(f"input-aware: ACC {report.acc:.3f} ASR {report.asr:.3f}")
    assert report.asr > 0.45 and report.acc > 0.4, report

    images = test_set.images[:16]
    patterns, masks = jax.jit(lambda attack, x: attack.patterns_and_masks(x))(result.attack, to_float(images))
    assert float(jnp.std(patterns, axis=0).mean()) > 0.01, "the generator ignores its input"
    assert 0.0 < float(masks.mean()) < 0.5

    run = _save_and_load(tmp_path, "small-bn", result.variables, result.attack, target, report)
    assert isinstance(run.attack, InputAware) and run.attack.channels == 16
    triggered = result.attack.apply_uint8(images)  # jitted once for the attack type and shape
    np.testing.assert_array_equal(run.attack.apply_uint8(images), triggered)
    meta, arrays = result.attack.to_record()
    assert "generator/params/down0_a_conv/kernel" in arrays and "mask_generator/batch_stats/middle_bn/mean" in arrays
    np.testing.assert_array_equal(from_record(meta, arrays).apply_uint8(images), triggered)


def test_input_aware_cannot_be_built_without_training_and_checks_its_settings(random_dataset):
    with pytest.raises(ValueError, match="train_input_aware"):
        make("input-aware", jax.random.key(0), (32, 32, 3))
    with pytest.raises(ValueError, match="no argument"):
        make("input-aware", jax.random.key(0), (32, 32, 3), density=0.1)
    with pytest.raises(ValueError, match="attack_rate"):
        InputAwareConfig(attack_rate=1.5)
    module = models.create("small", SYNTHETIC_INFO)
    with pytest.raises(ValueError, match="batch_size"):
        train_input_aware(module, random_dataset, TargetMap("all_to_one", 0, 4), jax.random.key(0),
                          train_config=TrainConfig(batch_size=64))
    with pytest.raises(ValueError, match="classes"):
        train_input_aware(module, random_dataset, TargetMap("all_to_one", 0, 43), jax.random.key(0))


def test_input_aware_trigger_is_a_pure_serialisable_function_of_the_input(uint8_images):
    """On initialised generators (4 wide): jit-able under strict promotion, per-image, in [0, 1],
    and identical after to_record -> JSON -> from_record."""
    import json

    from bdjax.attacks.input_aware import Generator

    def init(net, seed):
        return dict(net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False))

    attack = InputAware(generator=init(Generator(3, 4), 0), mask_generator=init(Generator(1, 4), 1), channels=4)
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        images = jnp.asarray(to_float(uint8_images))
        triggered = np.asarray(jax.jit(lambda a, x: a.apply(x))(attack, images))
        one = np.asarray(jax.jit(lambda a, x: a.apply(x))(attack, images[2]))
    assert triggered.shape == images.shape and triggered.min() >= 0.0 and triggered.max() <= 1.0
    np.testing.assert_allclose(one, triggered[2], atol=1e-5)  # eval-mode BatchNorm: per image
    meta, arrays = attack.to_record()
    again = from_record(json.loads(json.dumps(meta)), arrays)
    np.testing.assert_array_equal(again.apply_uint8(uint8_images), attack.apply_uint8(uint8_images))


@pytest.mark.slow
def test_input_aware_training_killed_after_an_epoch_resumes_to_the_uninterrupted_result(random_dataset, tmp_path,
                                                                                        monkeypatch):
    module = models.create("small", SYNTHETIC_INFO)
    target = TargetMap("all_to_one", 0, 4)
    config = InputAwareConfig(channels=4, mask_epochs=1)
    train_config = TrainConfig(epochs=2, batch_size=10, crop_padding=0)
    args = (module, random_dataset, target, jax.random.key(5), config, train_config)
    whole = train_input_aware(*args, progress=False, checkpoint_dir=tmp_path / "whole")

    save = checkpoint.save_training_state

    def save_then_die(directory, tree, meta):
        save(directory, tree, meta)
        if meta["epoch"] == 2:  # after the mask epoch and the first joint epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_input_aware(*args, progress=False, checkpoint_dir=tmp_path / "killed")
    monkeypatch.undo()
    assert json.loads((tmp_path / "killed" / checkpoint.TRAINING_META).read_text())["epoch"] == 2
    resumed = train_input_aware(*args, progress=False, checkpoint_dir=tmp_path / "killed")
    assert [h["stage"] for h in resumed.history] == ["mask", "joint", "joint"]
    assert resumed.history == whole.history
    for a, b in zip(jax.tree_util.tree_leaves((whole.variables, whole.attack)),
                    jax.tree_util.tree_leaves((resumed.variables, resumed.attack))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    other = dataclasses.replace(config, mask_density=0.1)  # another training's state is refused
    with pytest.raises(checkpoint.CheckpointError, match="another input-aware training"):
        train_input_aware(module, random_dataset, target, jax.random.key(5), other, train_config, progress=False,
                          checkpoint_dir=tmp_path / "killed")
