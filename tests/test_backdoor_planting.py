"""Planting a real backdoor: BadNets on a GTSRB subset reaches a high ASR and keeps clean ACC.

The models were planted by this library and committed (tests/models/, experiments/zoo-v2/,
experiments/zoo/); the `heavy` test retrains the test model's recipe from scratch (``make test-heavy``)."""

import numpy as np
import pytest

from bdjax import checkpoint

from conftest import GTSRB_TEST_SPEC, ZOO_CLEAN_DIR, ZOO_V2_DIR

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_badnets_on_real_gtsrb_reaches_high_asr(gtsrb_badnets_run):
    metrics = gtsrb_badnets_run.record["metrics"]
    assert metrics["asr"] > 0.9, metrics


# Each backdoored model beside its clean twin of the same zoo and recipe (zoo v2, full training split):
# ResNet-20 with the default recipe, medium-bn with the thesis recipe.
@pytest.mark.parametrize("zoo, model", [(ZOO_V2_DIR, "resnet20"), (ZOO_CLEAN_DIR.parent, "medium-bn")],
                         ids=["resnet20-v2", "medium-bn"])
def test_backdoor_keeps_accuracy_close_to_the_clean_model(zoo, model):
    """The zoo's backdoored and clean runs of one recipe (full test split)."""
    backdoored = checkpoint.read_record(zoo / f"{model}-gtsrb-badnets")["metrics"]["acc"]
    clean = checkpoint.read_record(zoo / f"{model}-gtsrb-clean")["metrics"]["acc"]
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


@pytest.mark.parametrize("vectorise", [True, False])
def test_train_runs_trains_models_of_one_recipe_together_on_one_poisoned_set(data_dir, tmp_path, vectorise):
    """Several model seeds of one recipe (one vmapped program, or a loop on the same data):
    same trigger and poisoned images, different models, each saved with its model seed."""
    import dataclasses

    import jax

    from bdjax.runs import RunSpec, train_runs

    spec = RunSpec(dataset="gtsrb", model="small", attack="badnets", target=14, epochs=1,
                   batch_size=64, train_subset=640, eval_limit=200)
    specs = [dataclasses.replace(spec, model_seed=k) for k in (0, 1)]
    runs = train_runs(specs, [tmp_path / "m0", tmp_path / "m1"], data_dir, progress=False, vectorise=vectorise)
    first, second = runs
    assert [RunSpec.from_record(r.record["spec"]) for r in runs] == specs
    assert first.record["poison_count"] == second.record["poison_count"] == 64
    assert first.record["trained_together"] == 2 and first.record["vectorised"] is vectorise
    np.testing.assert_array_equal(np.asarray(first.attack.mask), np.asarray(second.attack.mask))
    kernels = [jax.tree_util.tree_leaves(r.variables["params"])[0] for r in runs]
    assert not np.allclose(kernels[0], kernels[1]), "model seeds 0 and 1 gave the same model"
    with pytest.raises(ValueError, match="differ only in model_seed"):
        train_runs([spec, dataclasses.replace(spec, epochs=2)], [tmp_path / "a", tmp_path / "b"], data_dir)
    with pytest.raises(ValueError, match="one output directory per spec"):
        train_runs(specs, [tmp_path / "a"], data_dir)
