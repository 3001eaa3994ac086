"""Metrics and evaluation: ACC / ASR / SIA with the filter convention (a rejected input is
neither correct nor attack-successful), DER as defined by TSBD/BackdoorBench, detector
TPR/FPR, the thesis's success criterion, and test sets that measure label flips only."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from bdjax import metrics
from bdjax.attacks import TargetMap, make
from bdjax.data.dataset import Dataset
from bdjax.evaluation import Report, evaluate, evaluate_model, model_classifier
from bdjax.evaluation import TestSets as EvalSets  # a Test* name would be collected by pytest
from bdjax.models import predict

PRED = np.array([0, 1, 2, 3, 1, 1, 2, 0])
LABELS = np.array([0, 1, 2, 3, 0, 0, 0, 0])


# --- ACC / ASR / SIA ---------------------------------------------------------------------

def test_accuracy_is_the_fraction_of_correct_predictions():
    assert metrics.accuracy(PRED, LABELS) == 5 / 8


def test_a_rejected_input_counts_as_wrong_even_when_its_prediction_is_right():
    rejected = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)  # rejects one right, one wrong
    assert metrics.accuracy(PRED, LABELS, rejected) == 4 / 8
    assert metrics.accuracy(PRED, LABELS, np.zeros(8, bool)) == metrics.accuracy(PRED, LABELS)
    assert metrics.accuracy(PRED, LABELS, np.ones(8, bool)) == 0.0


def test_asr_counts_predictions_equal_to_the_target_and_rejection_defeats_the_attack():
    targets = np.zeros(8, int)
    assert metrics.attack_success_rate(PRED, targets) == 2 / 8
    rejected = PRED == 0  # a perfect filter of successful attacks
    assert metrics.attack_success_rate(PRED, targets, rejected) == 0.0


def test_sia_counts_triggered_inputs_still_classified_as_their_true_class():
    true_labels = np.array([1, 1, 2, 2, 3, 3, 0, 0])
    assert metrics.source_inference_accuracy(PRED, true_labels) == 3 / 8
    rejected = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    assert metrics.source_inference_accuracy(PRED, true_labels, rejected) == 2 / 8


def test_metrics_on_no_inputs_are_nan_and_mismatched_shapes_are_an_error():
    assert math.isnan(metrics.accuracy(np.zeros(0, int), np.zeros(0, int)))
    with pytest.raises(ValueError, match="matching"):
        metrics.accuracy(PRED, LABELS[:-1])
    with pytest.raises(ValueError, match="matching"):
        metrics.accuracy(PRED.reshape(2, 4), LABELS.reshape(2, 4))


# --- DER, TPR/FPR, success criterion ------------------------------------------------------

@pytest.mark.parametrize("before, after, der", [
    ((0.90, 1.00), (0.88, 0.02), (0.98 - 0.02 + 1) / 2),  # = 0.98
    ((0.90, 1.00), (0.90, 0.00), 1.0),  # ASR removed, nothing lost: the best defense
    ((0.90, 1.00), (0.90, 1.00), 0.5),  # a defense that does nothing
    ((0.90, 1.00), (0.10, 1.00), (0.0 - 0.80 + 1) / 2),  # only destroys accuracy
    ((0.90, 0.50), (0.95, 0.80), 0.5),  # gains are clipped: max(0, .) on both deltas
])
def test_der_is_half_of_asr_drop_minus_acc_drop_plus_one(before, after, der):
    assert metrics.defense_effectiveness_rating(*before, *after) == pytest.approx(der)


def test_tpr_is_over_triggered_inputs_and_fpr_over_clean_inputs():
    tpr, fpr = metrics.tpr_fpr([True, True, True, False], [False, False, True, False, False])
    assert (tpr, fpr) == (0.75, 0.2)
    tpr, fpr = metrics.tpr_fpr([], [True])
    assert math.isnan(tpr) and fpr == 1.0


@pytest.mark.parametrize("acc_after, asr_after, success", [
    (0.88, 0.02, True),
    (0.66, 0.02, True),  # ACC drop 0.24 < 0.25
    (0.65, 0.02, False),  # ACC drop 0.25 is not < 0.25
    (0.60, 0.02, False),
    (0.88, 0.24, True),  # ASR drop 0.76 > 0.75
    (0.88, 0.25, False),  # ASR drop 0.75 is not > 0.75
])
def test_successful_defense_needs_acc_drop_below_quarter_and_asr_drop_above_three_quarters(
        acc_after, asr_after, success):
    assert metrics.successful_defense(0.90, 1.00, acc_after, asr_after) is success


# --- evaluation with a defended classifier ------------------------------------------------

def indexed_set(info, labels, offset: int) -> Dataset:
    """Images whose first pixel is offset + i, so a fake classifier can tell them apart."""
    images = np.zeros((len(labels), *info.image_shape), np.uint8)
    images[:, 0, 0, 0] = offset + np.arange(len(labels))
    return Dataset(images, np.asarray(labels), info)


def lookup_classifier(table: dict[int, tuple[int, bool]]):
    """A fake defended classifier: first pixel -> (prediction, rejected)."""
    def classify(images):
        keys = np.asarray(images)[:, 0, 0, 0]
        pred = np.array([table[int(k)][0] for k in keys])
        rejected = np.array([table[int(k)][1] for k in keys], bool)
        return pred, rejected
    return classify


@pytest.fixture
def sets_and_classifier(info):
    clean = indexed_set(info, [0, 1, 2, 3], offset=0)
    triggered = indexed_set(info, [1, 2, 3, 1], offset=100)  # true labels; target 0
    sets = EvalSets(clean, triggered, np.zeros(4, np.int32))
    classify = lookup_classifier({
        0: (0, False), 1: (1, False), 2: (2, True), 3: (0, False),  # clean: 2 right, 1 rejected
        100: (0, False), 101: (0, True), 102: (3, False), 103: (1, True),  # triggered
    })
    return sets, classify


def test_evaluate_counts_rejected_inputs_as_wrong_for_acc_and_failed_for_asr(sets_and_classifier):
    sets, classify = sets_and_classifier
    report = evaluate(classify, sets)
    assert report == Report(acc=2 / 4, asr=1 / 4, sia=1 / 4)
    # 101 was predicted as the target but rejected: the attack failed there.
    assert set(report.to_dict()) == {"acc", "asr", "sia"}


def test_evaluate_as_detector_adds_tpr_over_triggered_and_fpr_over_clean(sets_and_classifier):
    sets, classify = sets_and_classifier
    report = evaluate(classify, sets, detector=True)
    assert (report.tpr, report.fpr) == (2 / 4, 1 / 4)
    assert report.to_dict() == dict(acc=0.5, asr=0.25, sia=0.25, tpr=0.5, fpr=0.25)


def test_evaluate_without_an_attack_reports_only_accuracy(info, sets_and_classifier):
    sets, classify = sets_and_classifier
    report = evaluate(classify, EvalSets.build(sets.clean, None, None))
    assert report.acc == 0.5 and math.isnan(report.asr) and math.isnan(report.sia)


def test_a_plain_model_as_classifier_never_rejects_and_scores_its_predictions(
        tiny_model, random_dataset):
    module, variables = tiny_model("small")
    pred, rejected = model_classifier(module, variables)(random_dataset.images)
    assert not rejected.any()
    np.testing.assert_array_equal(pred, predict(module, variables, random_dataset.images))
    sets = EvalSets.build(random_dataset, None, None)
    assert evaluate_model(module, variables, sets).acc == metrics.accuracy(pred, random_dataset.labels)


# --- test sets ----------------------------------------------------------------------------

def test_all_to_one_test_set_excludes_images_of_the_target_class(info, random_dataset):
    attack = make("badnets", jax.random.key(0), info.image_shape)
    target = TargetMap("all_to_one", target=2, num_classes=info.num_classes)
    sets = EvalSets.build(random_dataset, attack, target)

    assert len(sets.clean) == 40
    assert len(sets.triggered) == 30  # 10 images per class, class 2 left out
    assert not np.any(sets.triggered.labels == 2)
    np.testing.assert_array_equal(sets.targets, 2)
    source = random_dataset.labels != 2
    np.testing.assert_array_equal(sets.triggered.labels, random_dataset.labels[source])
    assert not np.array_equal(sets.triggered.images, random_dataset.images[source])


def test_all_to_all_test_set_keeps_every_image_and_shifts_its_label(info, random_dataset):
    attack = make("badnets", jax.random.key(0), info.image_shape)
    target = TargetMap("all_to_all", num_classes=info.num_classes)
    sets = EvalSets.build(random_dataset, attack, target)
    assert len(sets.triggered) == 40
    np.testing.assert_array_equal(sets.targets, (random_dataset.labels + 1) % 4)


def test_an_empty_evaluation_set_is_an_error(info, random_dataset):
    with pytest.raises(ValueError, match="empty"):
        EvalSets.build(random_dataset.subset(np.zeros(0, np.int64)), None, None)


def test_a_model_with_non_finite_weights_is_not_evaluated(tiny_model, random_dataset):
    module, variables = tiny_model("small")
    diverged = jax.tree_util.tree_map(lambda x: x * np.float32(np.nan), variables)
    with pytest.raises(FloatingPointError, match="NaN or inf values .*diverged"):
        model_classifier(module, diverged)
    with pytest.raises(FloatingPointError):
        evaluate_model(module, diverged, EvalSets.build(random_dataset, None, None))
