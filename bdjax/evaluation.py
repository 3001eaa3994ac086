"""ACC / ASR / SIA of a model, or of a defended classifier, on a clean and a triggered test set."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import metrics, sharding
from bdjax.attacks.base import Attack, TargetMap, poison_test_set
from bdjax.data.dataset import Dataset
from bdjax.models.inference import check_finite_variables, padded_batches, predict

# A defended classifier: uint8 images [N, H, W, C] -> (predictions int[N], rejected bool[N]).
Classifier = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def model_classifier(module, variables, batch_size: int = 500) -> Classifier:
    """The plain model as a classifier that never rejects.

    Refuses variables holding NaN or inf (a diverged training or repair): such a model predicts
    one class for everything, which would read as a removed backdoor."""
    check_finite_variables(variables)

    def classify(images):
        pred = predict(module, variables, images, batch_size)
        return pred, np.zeros(pred.shape, bool)
    return classify


@dataclasses.dataclass(frozen=True)
class TestSets:
    """A clean evaluation set and its triggered copy (only images the attack relabels)."""

    __test__ = False  # not a pytest test class, despite its name

    clean: Dataset
    triggered: Dataset  # triggered images with their TRUE labels
    targets: np.ndarray  # target label of each triggered image

    @classmethod
    def build(cls, clean: Dataset, attack: Attack | None, target: TargetMap | None) -> "TestSets":
        if len(clean) == 0:
            raise ValueError("the evaluation set is empty")
        if attack is None:
            empty = clean.subset(np.zeros((0,), np.int64))
            return cls(clean, empty, np.zeros((0,), np.int32))
        triggered, targets = poison_test_set(clean, attack, target)
        return cls(clean, triggered, targets)


@dataclasses.dataclass(frozen=True)
class Report:
    acc: float
    asr: float
    sia: float
    tpr: float | None = None  # detectors only: triggered inputs rejected
    fpr: float | None = None  # detectors only: clean inputs rejected

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def evaluate(classifier: Classifier, sets: TestSets, detector: bool = False) -> Report:
    """Rejected inputs count as wrong for ACC and as failed for ASR (the filter convention)."""
    clean = classifier(sets.clean.images)
    triggered = classifier(sets.triggered.images) if len(sets.triggered) else None
    return report_from_predictions(sets, clean, triggered, detector)


def report_from_predictions(sets: TestSets, clean: tuple, triggered: tuple | None,
                            detector: bool = False) -> Report:
    """The Report of ``evaluate`` from (predictions, rejected) pairs on the two sets."""
    clean_pred, clean_rejected = clean
    acc = metrics.accuracy(clean_pred, sets.clean.labels, clean_rejected)
    if len(sets.triggered) == 0:
        return Report(acc, float("nan"), float("nan"))
    trig_pred, trig_rejected = triggered
    asr = metrics.attack_success_rate(trig_pred, sets.targets, trig_rejected)
    sia = metrics.source_inference_accuracy(trig_pred, sets.triggered.labels, trig_rejected)
    if not detector:
        return Report(acc, asr, sia)
    tpr, fpr = metrics.tpr_fpr(trig_rejected, clean_rejected)
    return Report(acc, asr, sia, tpr, fpr)


@functools.partial(jax.jit, static_argnums=0)
def _stacked_predictions(module, stacked_variables, images):
    logits = jax.vmap(lambda v: module.apply(v, images, train=False))(stacked_variables)
    return jnp.argmax(logits, -1).astype(jnp.int32)


def stacked_predictions(module, stacked_variables, images, batch_size: int = 250, mesh=None) -> np.ndarray:
    """int32[M, N]: the predictions of M models (variables stacked on a leading axis) at once.

    With ``mesh`` the model axis is split over its devices (M a multiple of the mesh size).
    """
    stacked_variables = sharding.shard_leading(stacked_variables, mesh)
    if len(images) == 0:
        num_models = jax.tree_util.tree_leaves(stacked_variables)[0].shape[0]
        return np.zeros((num_models, 0), np.int32)
    return np.concatenate([np.asarray(_stacked_predictions(module, stacked_variables, chunk))[:, :count]
                           for chunk, count in padded_batches(images, batch_size)], axis=1)


def evaluate_stacked(module, stacked_variables, sets: TestSets, mesh=None) -> list[Report]:
    """``evaluate_model`` for M models whose variables are stacked on a leading axis, vmapped."""
    clean = stacked_predictions(module, stacked_variables, sets.clean.images, mesh=mesh)
    triggered = stacked_predictions(module, stacked_variables, sets.triggered.images, mesh=mesh)
    never = np.zeros(clean.shape[1], bool), np.zeros(triggered.shape[1], bool)
    return [report_from_predictions(sets, (clean[m], never[0]), (triggered[m], never[1]))
            for m in range(clean.shape[0])]


def evaluate_model(module, variables, sets: TestSets) -> Report:
    return evaluate(model_classifier(module, variables), sets)
