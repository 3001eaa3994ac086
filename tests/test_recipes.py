"""Named training recipes and how a run's spec resolves to a training configuration."""

import dataclasses

import pytest

from bdjax import recipes
from bdjax.runs import RunSpec


def test_default_recipe_is_sgd_nesterov_with_warmup_cosine_weight_decay_and_crops():
    config = recipes.get("default").train_config("cifar10")
    assert (config.optimizer, config.nesterov, config.momentum, config.schedule) == ("sgd", True, 0.9, "cosine")
    assert config.warmup_fraction > 0 and config.crop_padding == 4
    assert config.flip is None  # the dataset decides: flips on CIFAR, none on GTSRB's signs
    gtsrb = recipes.get("default").train_config("gtsrb")
    assert (config.epochs, config.weight_decay) == (40, 1e-4) and (gtsrb.epochs, gtsrb.weight_decay) == (5, 5e-4)


def test_a_spec_overrides_the_weight_decay_a_dataset_gives():
    config = RunSpec(dataset="cifar10", weight_decay=5e-4).train_config()
    assert (config.weight_decay, config.epochs) == (5e-4, 40)
    assert RunSpec(dataset="cifar10", weight_decay=0.0).train_config().weight_decay == 0.0
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        RunSpec(weight_decay=-1e-4)


def test_backdoorbench_and_thesis_recipes():
    bb = recipes.get("backdoorbench").train_config("cifar10")
    assert (bb.optimizer, bb.learning_rate, bb.weight_decay, bb.schedule, bb.epochs) == ("sgd", 0.01, 5e-4, "cosine", 100)
    thesis = recipes.get("thesis").train_config("gtsrb")
    assert (thesis.optimizer, thesis.learning_rate, thesis.epochs, thesis.crop_padding) == ("adam", 1e-3, 15, 0)


def test_spec_fields_override_single_recipe_fields():
    config = RunSpec(dataset="gtsrb", recipe="default", epochs=2, learning_rate=0.01).train_config()
    assert (config.epochs, config.learning_rate, config.optimizer) == (2, 0.01, "sgd")


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        RunSpec(recipe="fast")


def test_records_from_before_recipes_read_back_as_the_thesis_recipe():
    legacy = {k: v for k, v in dataclasses.asdict(RunSpec()).items() if k != "recipe"}
    legacy.update(epochs=8, batch_size=128, optimizer="adam", learning_rate=1e-3, crop_padding=0)
    spec = RunSpec.from_record(legacy)
    assert spec.recipe == "thesis" and spec.epochs == 8 and spec.optimizer is None
    assert spec.train_config() == dataclasses.replace(recipes.get("thesis").train_config("gtsrb"), epochs=8)


def test_switching_the_optimizer_takes_its_own_learning_rate_unless_one_is_given():
    assert RunSpec(dataset="gtsrb", optimizer="adam").train_config().learning_rate == 1e-3
    assert RunSpec(dataset="gtsrb", optimizer="adam", learning_rate=3e-4).train_config().learning_rate == 3e-4
    assert RunSpec(dataset="gtsrb", recipe="thesis", optimizer="sgd").train_config().learning_rate == 0.05
    assert RunSpec(dataset="gtsrb", optimizer="sgd").train_config().learning_rate == 0.05  # the recipe's own


def test_a_legacy_record_with_sgd_at_the_thesis_rate_keeps_its_rate():
    legacy = {k: v for k, v in dataclasses.asdict(RunSpec()).items() if k != "recipe"}
    legacy.update(epochs=15, batch_size=128, optimizer="sgd", learning_rate=1e-3, crop_padding=0)
    config = RunSpec.from_record(legacy).train_config()
    assert (config.optimizer, config.learning_rate) == ("sgd", 1e-3)


def test_a_short_run_with_crops_gets_a_note_and_a_recipe_length_run_none():
    config = recipes.get("default").train_config("gtsrb")
    assert recipes.few_steps_note(config, 39209) is None  # 5 epochs of the full split
    short = dataclasses.replace(config, epochs=3)
    assert "561 optimizer steps" in recipes.few_steps_note(short, 12000)  # 12,000 // 64 = 187 per epoch
    assert recipes.few_steps_note(dataclasses.replace(short, crop_padding=0), 12000) is None
