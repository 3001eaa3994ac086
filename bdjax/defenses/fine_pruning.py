"""FP: fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

Backdoor neurons stay dormant on clean inputs. Prune the last layer's neurons in order of
increasing mean clean activation while the clean accuracy drop stays below 10%, then
fine-tune. As BackdoorBench's ``defense/fp.py`` (and the paper's "last convolutional layer",
read after its nonlinearity), the neurons are the pooled features that feed the classifier;
pruning one zeroes its column of the classifier (its row of the Flax kernel). In a ResNet
these features are the last block's output *after* the residual addition: zeroing the BN of
the block's conv2 (``layer="last_conv"``, bdjax's earlier choice) does not silence them,
because the shortcut still carries the block's input.

BackdoorBench picks the pruning amount with test data; here the clean set is split:
activations come from its fit part, the accuracy drop is measured on its held-out
validation part, and fine-tuning (our FT) uses the whole clean set. Deliberate differences
from BackdoorBench: one neuron per pruning step (it prunes ``num_pruned - 1`` at its step
``num_pruned``); the pruned weights are re-zeroed after fine-tuning where BackdoorBench keeps a
prune mask on them during it (the same model at the end; fine-tuning sees them briefly).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import surgery
from bdjax.data import train_val_split
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.finetune import FinetuneConfig, finetune

LAYERS = ("features", "last_conv")
CLASSIFIER = ("classifier",)  # every bdjax architecture names its final Dense so


@dataclasses.dataclass(frozen=True)
class FinePruningConfig:
    """``max_acc_drop`` 0.1: "prune while clean accuracy drops by less than 10%" (SPEC,
    "Baselines"; BackdoorBench's FP, ``acc_ratio``). ``relative_drop``: the drop is
    (ACC₀ − ACC) / ACC₀ as BackdoorBench measures it (False: ACC₀ − ACC, bdjax's earlier rule).
    ``val_fraction`` of the clean set measures that drop.
    ``layer``: "features" (the pooled features feeding the classifier, BackdoorBench) or
    "last_conv" (the last non-shortcut conv's BN channels, bdjax's earlier choice).
    ``finetune``: our FT's recipe (SGD lr 0.01, cosine, 20 epochs)."""

    max_acc_drop: float = 0.10
    relative_drop: bool = True
    val_fraction: float = 0.2
    layer: str = "features"
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if not 0.0 < self.max_acc_drop <= 1.0:
            raise ValueError(f"max_acc_drop must be in (0, 1], got {self.max_acc_drop}")
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")


def last_conv_unit(module):
    units = [u for u in module.conv_units() if not u.shortcut]
    if not units:
        raise ValueError("fine-pruning needs a conv layer: module.conv_units() lists none")
    return units[-1]


def mean_activation(module, variables, images, unit) -> jax.Array:
    """Mean post-ReLU activation of each channel of ``unit`` over images f32[N, H, W, C] -> f32[C]."""
    outputs = surgery.unit_outputs(module, variables, images, [unit])[unit.name]
    return jnp.maximum(outputs, 0.0).mean(axis=(0, 1, 2))


def feature_activation(module, variables, images) -> jax.Array:
    """Mean of each pooled feature reaching the classifier over images f32[N, H, W, C] -> f32[F]
    (BackdoorBench's FP: the input of the model's last layer, averaged over the clean set)."""
    return surgery.layer_inputs(module, variables, images, [CLASSIFIER])[CLASSIFIER].mean(axis=0)


def prune_features(variables, features) -> dict:
    """The classifier no longer reads ``features``: their rows of its kernel [F, classes] are zeroed."""
    if not features:
        return variables
    head = surgery.get_path(variables["params"], CLASSIFIER)
    kernel = head["kernel"].at[jnp.asarray(features, jnp.int32)].set(0.0)
    return {**variables, "params": surgery.set_path(variables["params"], CLASSIFIER, {**head, "kernel": kernel})}


def feature_pruning_curve(module, variables, val: Dataset, order) -> np.ndarray:
    """Validation accuracy with the first k features of ``order`` pruned, k = 0..F (vmapped over k)."""
    features = len(order)
    rank = jnp.zeros((features,), jnp.int32).at[jnp.asarray(order)].set(jnp.arange(features))
    keep = (rank[None, :] >= jnp.arange(features + 1)[:, None]).astype(jnp.float32)  # [F + 1, F]
    images, labels = jnp.asarray(val.floats()), jnp.asarray(val.labels)
    head = surgery.get_path(variables["params"], CLASSIFIER)

    def masked_accuracy(mask, images, labels):
        params = surgery.set_path(variables["params"], CLASSIFIER, {**head, "kernel": head["kernel"] * mask[:, None]})
        logits = module.apply({**variables, "params": params}, images, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    return np.asarray(jax.jit(jax.vmap(masked_accuracy, in_axes=(0, None, None)))(keep, images, labels))


def pruned_count(curve, max_acc_drop: float, relative: bool = True) -> int:
    """How many to prune: "while" the drop from ``curve[0]`` stays below the limit, i.e. stop
    before the first k that breaks it. ``relative``: the drop divided by ``curve[0]``."""
    drop = curve[0] - curve
    if relative:
        drop = drop / max(float(curve[0]), 1e-12)
    too_far = np.flatnonzero(drop >= max_acc_drop)
    return int(too_far[0]) - 1 if too_far.size else len(curve) - 1


def pruning_curve(module, variables, val: Dataset, unit, order) -> np.ndarray:
    """Validation accuracy with the first k channels of ``order`` pruned, k = 0..C (vmapped over k)."""
    channels = len(order)
    rank = jnp.zeros((channels,), jnp.int32).at[jnp.asarray(order)].set(jnp.arange(channels))
    keep = (rank[None, :] >= jnp.arange(channels + 1)[:, None]).astype(jnp.float32)  # [C + 1, C]
    images, labels = jnp.asarray(val.floats()), jnp.asarray(val.labels)

    def masked_accuracy(mask, images, labels):
        logits = surgery.scale_channels(module, variables, images, {unit.output: mask})
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    return np.asarray(jax.jit(jax.vmap(masked_accuracy, in_axes=(0, None, None)))(keep, images, labels))


def prune_channels(variables, unit, channels) -> dict:
    """The unit's channels output 0: BN γ and β zeroed (or the conv kernel and bias without BN)."""
    if not channels:
        return variables
    if unit.bn is not None:
        return surgery.zero_bn_neurons(variables, unit, channels)
    return surgery.zero_conv_channels(variables, unit, channels, keep_bias=False)


@register("fp", FinePruningConfig, kind="pruning",
          paper="Liu, Dolan-Gavitt & Garg, RAID 2018",
          summary="fine-pruning: prune dormant last-layer channels, then fine-tune")
def fine_pruning(module, variables, clean: Dataset, key, config: FinePruningConfig = FinePruningConfig()) -> DefenseResult:
    """Prune the least-active neurons of the last layer (``config.layer``) while the clean
    validation accuracy drop is < ``max_acc_drop``, fine-tune, and keep the pruned ones at zero.

    ``info``: "unit" (what was pruned), "activation" (f32[C], on the fit part), "order"
    (pruning order), "curve" (validation accuracy after pruning k = 0..C), "pruned", "train_loss".
    """
    check_clean_set(clean, "fine-pruning", min_size=2)
    split_key, tune_key = jax.random.split(key)
    fit, val = train_val_split(clean, config.val_fraction, split_key)
    if config.layer == "features":
        name = "/".join(CLASSIFIER) + " (input features)"
        activation = feature_activation(module, variables, jnp.asarray(fit.floats()))
        order = np.argsort(np.asarray(activation), kind="stable")
        curve = feature_pruning_curve(module, variables, val, order)
        prune = prune_features
    else:
        unit = last_conv_unit(module)
        name = unit.name
        activation = mean_activation(module, variables, jnp.asarray(fit.floats()), unit)
        order = np.argsort(np.asarray(activation), kind="stable")
        curve = pruning_curve(module, variables, val, unit, order)

        def prune(variables, channels):
            return prune_channels(variables, unit, channels)
    count = pruned_count(curve, config.max_acc_drop, config.relative_drop)
    pruned = sorted(int(c) for c in order[:count])
    tuned = finetune(module, prune(variables, pruned), clean, tune_key, config.finetune)
    # Fine-tuning moves the pruned weights again (their gradient is not masked): zero them again.
    repaired = prune(tuned.variables, pruned)
    return DefenseResult(repaired, info={
        "unit": name, "activation": np.asarray(activation), "order": order.tolist(), "curve": curve,
        "pruned": pruned, "pruned_count": len(pruned), "train_loss": tuned.info["train_loss"],
    })
