"""Planting a real backdoor: BadNets on a GTSRB subset reaches a high ASR and keeps clean ACC.

The models were planted by this library and committed (tests/models/, experiments/zoo/); the
`heavy` test retrains the test model's recipe from scratch (``make test-heavy``)."""

import numpy as np
import pytest

from bdjax import checkpoint

from conftest import GTSRB_TEST_SPEC, ZOO_DIR

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_badnets_on_real_gtsrb_reaches_high_asr(gtsrb_badnets_run):
    metrics = gtsrb_badnets_run.record["metrics"]
    assert metrics["asr"] > 0.9, metrics


@pytest.mark.parametrize("model", ["medium-bn", "resnet20"])
def test_backdoor_keeps_accuracy_close_to_the_clean_model(model):
    """The zoo's backdoored and clean runs of one recipe (15,000 GTSRB images; full test split)."""
    backdoored = checkpoint.read_record(ZOO_DIR / f"{model}-gtsrb-badnets")["metrics"]["acc"]
    clean = checkpoint.read_record(ZOO_DIR / f"{model}-gtsrb-clean")["metrics"]["acc"]
    assert clean > 0.8, "the model should learn GTSRB at all"
    assert abs(backdoored - clean) < 0.06, (backdoored, clean)


def test_clean_model_does_not_follow_the_trigger(zoo_clean_run, gtsrb_badnets_run, gtsrb_test):
    """The trigger alone is not enough: ASR of a clean model is near the chance of predicting 14."""
    from bdjax.evaluation import TestSets, evaluate_model
    sets = TestSets.build(gtsrb_test, gtsrb_badnets_run.attack, gtsrb_badnets_run.target)
    report = evaluate_model(zoo_clean_run.module, zoo_clean_run.variables, sets)
    assert report.asr < 0.1, report


def test_run_directory_holds_the_trigger_and_the_recipe(gtsrb_badnets_run):
    record = gtsrb_badnets_run.record
    assert record["spec"]["attack"] == "badnets" and record["target"]["target"] == 14
    assert record["poison_count"] == round(0.1 * record["train_size"])
    mask = np.asarray(gtsrb_badnets_run.attack.mask)[..., 0]
    assert mask[:2, :2].all() and mask.sum() == 4  # 2x2 patch in the upper-left corner
    assert isinstance(gtsrb_badnets_run, checkpoint.Run)


@pytest.mark.heavy
def test_the_test_models_recipe_plants_the_backdoor_again(gtsrb_badnets_run, data_dir, tmp_path):
    """Training GTSRB_TEST_SPEC from scratch (~80 s on 2 cores) plants the backdoor again.

    Weights differ between machines (XLA:CPU codegen), so ACC is compared loosely."""
    from bdjax.runs import train_run

    metrics = train_run(GTSRB_TEST_SPEC, tmp_path / "run", data_dir, progress=False).record["metrics"]
    assert metrics["asr"] > 0.9, metrics
    assert abs(metrics["acc"] - gtsrb_badnets_run.record["metrics"]["acc"]) < 0.1, metrics
