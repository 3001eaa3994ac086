"""Baselines of TSBD's table: FP (fine-pruning, Liu et al. 2018) and RNP (Li et al. 2023)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bdjax import defenses, surgery
from bdjax.defenses import fine_pruning, rnp
from bdjax.defenses.finetune import FinetuneConfig
from bdjax.evaluation import evaluate_model
from bdjax.runs import split_for_defense
from bdjax.surgery import get_path


def test_fp_activation_is_the_mean_relu_output_of_the_last_conv(tiny_model, images):
    module, variables = tiny_model("small-bn")
    unit = fine_pruning.last_conv_unit(module)
    assert unit == module.conv_units()[-1]
    outputs = np.asarray(surgery.unit_outputs(module, variables, images, [unit])[unit.name])
    np.testing.assert_allclose(fine_pruning.mean_activation(module, variables, images, unit),
                               np.maximum(outputs, 0).mean(axis=(0, 1, 2)), rtol=1e-5)


def test_fp_pruning_curve_equals_evaluating_each_pruned_model(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    unit = fine_pruning.last_conv_unit(module)
    order = np.arange(16)[::-1]
    curve = fine_pruning.pruning_curve(module, variables, random_dataset, unit, order)
    assert curve.shape == (17,)
    for k in (0, 5, 16):
        pruned = fine_pruning.prune_channels(variables, unit, sorted(order[:k].tolist()))
        pred = np.asarray(module.apply(pruned, random_dataset.floats()).argmax(-1))
        assert curve[k] == pytest.approx(np.mean(pred == random_dataset.labels))


def test_fp_prunes_while_the_validation_drop_stays_below_the_limit(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    config = fine_pruning.FinePruningConfig(max_acc_drop=0.1, val_fraction=0.5, layer="last_conv", relative_drop=False,
                                            finetune=FinetuneConfig(epochs=1, batch_size=10))
    result = fine_pruning.fine_pruning(module, variables, random_dataset, jax.random.key(0), config)
    info, curve = result.info, result.info["curve"]
    count = info["pruned_count"]
    assert np.all(curve[0] - curve[:count + 1] < 0.1)
    assert count == 16 or curve[0] - curve[count + 1] >= 0.1
    assert info["pruned"] == sorted(info["order"][:count])
    unit = fine_pruning.last_conv_unit(module)
    bn = get_path(result.variables["params"], unit.bn)
    assert np.all(np.asarray(bn["scale"])[info["pruned"]] == 0) and np.all(np.asarray(bn["bias"])[info["pruned"]] == 0)


def test_fp_ranks_the_pooled_features_that_feed_the_classifier(tiny_model, images):
    """BackdoorBench's FP hooks the input of the last layer: in a ResNet the last block's output
    after the residual addition and the ReLU, averaged over space."""
    module, variables = tiny_model("resnet20")
    last_block = module._blocks()[-1][0]
    block_out = surgery.layer_outputs(module, variables, images, [(last_block,)])[(last_block,)]
    np.testing.assert_allclose(fine_pruning.feature_activation(module, variables, images),
                               np.asarray(block_out).mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert fine_pruning.FinePruningConfig().layer == "features"


def test_zeroing_the_last_conv_bn_does_not_silence_a_residual_block_but_pruning_features_does(tiny_model, images):
    module, variables = tiny_model("resnet20")
    unit = fine_pruning.last_conv_unit(module)
    every = list(range(int(surgery.get_path(variables["params"], unit.bn)["scale"].shape[0])))
    silenced_bn = fine_pruning.prune_channels(variables, unit, every)
    features = fine_pruning.feature_activation(module, silenced_bn, images)
    assert float(np.max(features)) > 0.0  # the shortcut still carries the block's input
    head = surgery.get_path(variables["params"], fine_pruning.CLASSIFIER)
    pruned = fine_pruning.prune_features(variables, list(range(head["kernel"].shape[0])))
    logits = module.apply(pruned, images)
    np.testing.assert_allclose(logits, np.broadcast_to(head["bias"], logits.shape), atol=1e-6)


def test_fp_on_features_stops_before_a_relative_drop_of_ten_percent(tiny_model, random_dataset):
    module, variables = tiny_model("resnet20")
    config = fine_pruning.FinePruningConfig(val_fraction=0.5, finetune=FinetuneConfig(epochs=1, batch_size=10))
    result = fine_pruning.fine_pruning(module, variables, random_dataset, jax.random.key(0), config)
    info, curve = result.info, result.info["curve"]
    count = info["pruned_count"]
    assert info["unit"].startswith("classifier")
    assert np.all((curve[0] - curve[:count + 1]) / curve[0] < 0.1)
    assert count == len(curve) - 1 or (curve[0] - curve[count + 1]) / curve[0] >= 0.1
    kernel = np.asarray(get_path(result.variables["params"], fine_pruning.CLASSIFIER)["kernel"])
    assert np.all(kernel[info["pruned"]] == 0)
    assert fine_pruning.pruned_count(np.array([0.5, 0.48, 0.46, 0.44]), 0.1) == 2  # 0.06 / 0.5 = 12% at k = 3
    assert fine_pruning.pruned_count(np.array([0.5, 0.48, 0.46, 0.44]), 0.1, relative=False) == 3


def test_rnp_prunes_gamma_of_neurons_with_mask_below_threshold(tiny_model):
    module, variables = tiny_model("small-bn")
    units = surgery.bn_units(module)
    masks = {u.name: np.linspace(0, 1, get_path(variables["params"], u.bn)["scale"].shape[0]) for u in units}
    pruned_variables, pruned = rnp.prune_by_mask(module, variables, masks, 0.7)
    for unit in units:
        low = np.flatnonzero(masks[unit.name] < 0.7)
        assert pruned[unit.name] == low.tolist()
        before, after = get_path(variables["params"], unit.bn), get_path(pruned_variables["params"], unit.bn)
        expected = np.asarray(before["scale"]).copy()
        expected[low] = 0.0
        np.testing.assert_array_equal(after["scale"], expected)
        np.testing.assert_array_equal(after["bias"], before["bias"])  # RNP's code zeroes the BN weight only


def test_rnp_masks_start_at_one_and_stay_in_the_unit_interval(tiny_model, random_dataset):
    module, variables = tiny_model("small-bn")
    masks = rnp.learn_neuron_masks(module, variables, random_dataset, jax.random.key(0), epochs=2, batch_size=20)
    assert set(masks) == {u.name for u in surgery.bn_units(module)}
    values = np.concatenate(list(masks.values()))
    assert np.all((values >= 0) & (values <= 1)) and np.any(values < 1)


def test_bad_inputs_raise_clear_errors(tiny_model, random_dataset):
    empty = random_dataset.subset(np.zeros((0,), np.int64))
    module, variables = tiny_model("small-bn")
    with pytest.raises(ValueError, match="clean defense set of at least 2 images, got 0"):
        fine_pruning.fine_pruning(module, variables, empty, jax.random.key(0))
    with pytest.raises(ValueError, match="clean defense set of at least 1 images, got 0"):
        rnp.rnp(module, variables, empty, jax.random.key(0))
    module, variables = tiny_model("small")
    with pytest.raises(ValueError, match="no BatchNorm"):
        rnp.rnp(module, variables, random_dataset, jax.random.key(0))
    with pytest.raises(ValueError, match="max_acc_drop"):
        fine_pruning.FinePruningConfig(max_acc_drop=0.0)


def test_both_baselines_are_registered():
    assert defenses.get("fp").config_cls is fine_pruning.FinePruningConfig
    assert defenses.get("rnp").config_cls is rnp.RnpConfig


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_fp_lowers_the_asr_of_a_real_badnets_model_and_keeps_clean_accuracy(zoo_badnets_run, gtsrb_ten_per_class):
    """Zoo v2 medium-bn, real GTSRB BadNets (ASR 0.999, ACC 0.949 on these 1,000 images), 430 clean
    images, FP's defaults (20 fine-tuning epochs).

    Measured: FP prunes 3 of 16 pooled features (BackdoorBench's layer), ASR 0.999 -> 0.191,
    ACC 0.949 -> 0.890 (AMD EPYC CPU, 2026-12-04). It lowers the backdoor by four fifths without
    removing it. With 10 fine-tuning epochs the end point moved with the CPU: ASR 0.195 on the
    2026-12-03 machine, 0.323 on this one, so the test runs the default length. On the weaker
    zoo v1 model it went further (ASR 0.995 -> 0.066, ACC 0.894 -> 0.712)."""
    run = zoo_badnets_run
    clean, sets = gtsrb_ten_per_class
    before = evaluate_model(run.module, run.variables, sets)
    fp = fine_pruning.fine_pruning(run.module, run.variables, clean, jax.random.key(0),
                                   fine_pruning.FinePruningConfig())
    after = evaluate_model(run.module, fp.variables, sets)
    print(f"before {before}; FP {after} ({fp.info['pruned_count']} pruned)")
    assert before.asr > 0.95
    assert fp.info["pruned_count"] > 0 and after.asr < 0.3
    assert after.acc > before.acc - 0.1


@pytest.mark.realdata
def test_rnp_with_its_threshold_chosen_on_clean_data_removes_the_backdoor_and_keeps_accuracy(zoo_resnet20_run,
                                                                                              data_dir):
    """Zoo v2 ResNet-20 GTSRB BadNets, 10 clean test images per class. RNP's paper threshold 0.7
    prunes the model with the backdoor; the threshold chosen on the defender's clean set
    (threshold=None: the largest keeping its clean ACC within 10 points) keeps it.

    Measured: unlearning reaches clean ACC 0.023 in 9 steps; at 0.7 the defender's set keeps ACC
    0.04; the chosen 0.05 (defender's ACC 0.884 against 0.94 unpruned): 27 of 688 neurons pruned,
    ASR 1.000 -> 0.001, ACC 0.976 -> 0.915 on 1,000 test images."""
    run = zoo_resnet20_run
    clean, sets = split_for_defense(run, 10, 0, data_dir, eval_limit=1000)
    before = evaluate_model(run.module, run.variables, sets)
    result = rnp.rnp(run.module, run.variables, clean, jax.random.key(0), rnp.RnpConfig(threshold=None))
    after = evaluate_model(run.module, result.variables, sets)
    at_paper, _ = rnp.prune_by_mask(run.module, run.variables, result.info["masks"], 0.7)
    paper = evaluate_model(run.module, at_paper, sets)
    print(f"RNP: before {before}, chosen {result.info['threshold']} ({result.info['pruned_count']} pruned) {after}, "
          f"at 0.7 {paper}, unlearning {result.info['unlearning']}")
    assert result.info["unlearning"]["reached"]
    curve = result.info["clean_accuracy_by_threshold"]
    assert curve[result.info["threshold"]] >= curve[0.0] - 0.1 - 1e-6  # chosen on clean data only
    assert before.asr > 0.95 and after.asr < 0.1 and after.acc > before.acc - 0.1
    assert paper.acc < 0.2  # RNP's own threshold takes the model with the backdoor


def test_rnp_threshold_choice_takes_the_largest_within_the_budget_and_falls_back_to_no_pruning(random_dataset,
                                                                                                 monkeypatch):
    # Clean accuracy as a function of the threshold (None: unpruned): 1.0, 0.95 at 0.1, 0.8 at 0.3, 0.2 at 0.7.
    accuracy = {None: 1.0, 0.1: 0.95, 0.3: 0.8, 0.7: 0.2}
    monkeypatch.setattr(rnp, "prune_by_mask", lambda module, variables, masks, threshold: (threshold, {}))
    labels = random_dataset.labels

    def predict(module, threshold, images):  # a fraction accuracy[threshold] of the labels right
        right = np.arange(len(labels)) < round(accuracy[threshold] * len(labels))
        return np.where(right, labels, labels + 1)

    monkeypatch.setattr(rnp, "predict", predict)
    assert rnp.choose_threshold(None, None, {}, random_dataset, (0.1, 0.3, 0.7), 0.25)[0] == 0.3
    threshold, curve = rnp.choose_threshold(None, None, {}, random_dataset, (0.7, 0.1, 0.3), 0.1)
    assert threshold == 0.1 and list(curve) == [0.0, 0.7, 0.3, 0.1]  # largest first, stops at the first kept
    assert rnp.choose_threshold(None, None, {}, random_dataset, (0.3, 0.7), 0.1)[0] == 0.0  # nothing kept: no pruning
    with pytest.raises(ValueError, match="thresholds must not be empty"):
        rnp.RnpConfig(threshold=None, thresholds=())


def test_a_dict_for_a_nested_config_overrides_only_the_named_fields():
    """``--set finetune={'epochs':5}`` (CLI, literal_eval) or a dict in Python reaches FP's FinetuneConfig."""
    config = defenses.make_config(fine_pruning.FinePruningConfig, {"finetune": {"epochs": 5}, "max_acc_drop": 0.2})
    assert config.finetune == FinetuneConfig(epochs=5) and config.max_acc_drop == 0.2
    with pytest.raises(ValueError, match=r"FinetuneConfig has no field\(s\) \['epoch'\]"):
        defenses.make_config(fine_pruning.FinePruningConfig, {"finetune": {"epoch": 5}})
