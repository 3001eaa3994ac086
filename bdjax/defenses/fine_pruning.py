"""FP: fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

Backdoor neurons stay dormant on clean inputs. Prune the last conv layer's channels in
order of increasing mean clean activation while the clean accuracy drop stays below 10%,
then fine-tune. BackdoorBench picks the pruning amount with test data; here the clean set
is split: activations come from its fit part, the accuracy drop is measured on its held-out
validation part, and fine-tuning (our FT) uses the whole clean set.
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


@dataclasses.dataclass(frozen=True)
class FinePruningConfig:
    """``max_acc_drop`` 0.1: "prune while clean accuracy drops by less than 10%" (SPEC,
    "Baselines"; BackdoorBench's FP). ``val_fraction`` of the clean set measures that drop.
    ``finetune``: our FT's recipe (SGD lr 0.01, cosine, 20 epochs)."""

    max_acc_drop: float = 0.10
    val_fraction: float = 0.2
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if not 0.0 < self.max_acc_drop <= 1.0:
            raise ValueError(f"max_acc_drop must be in (0, 1], got {self.max_acc_drop}")


def last_conv_unit(module):
    units = [u for u in module.conv_units() if not u.shortcut]
    if not units:
        raise ValueError("fine-pruning needs a conv layer: module.conv_units() lists none")
    return units[-1]


def mean_activation(module, variables, images, unit) -> jax.Array:
    """Mean post-ReLU activation of each channel of ``unit`` over images f32[N, H, W, C] -> f32[C]."""
    outputs = surgery.unit_outputs(module, variables, images, [unit])[unit.name]
    return jnp.maximum(outputs, 0.0).mean(axis=(0, 1, 2))


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
    """Prune the least-active channels of the last conv while the clean validation accuracy
    drop is < ``max_acc_drop``, fine-tune, and keep the pruned channels at zero.

    ``info``: "activation" (f32[C], on the fit part), "order" (pruning order), "curve"
    (validation accuracy after pruning k = 0..C), "pruned" (channels), "train_loss".
    """
    check_clean_set(clean, "fine-pruning", min_size=2)
    split_key, tune_key = jax.random.split(key)
    fit, val = train_val_split(clean, config.val_fraction, split_key)
    unit = last_conv_unit(module)
    activation = mean_activation(module, variables, jnp.asarray(fit.floats()), unit)
    order = np.argsort(np.asarray(activation), kind="stable")
    curve = pruning_curve(module, variables, val, unit, order)
    # "While" the drop stays below the limit: stop at the first k that breaks it.
    too_far = np.flatnonzero(curve[0] - curve >= config.max_acc_drop)
    count = int(too_far[0]) - 1 if too_far.size else len(order)
    pruned = sorted(int(c) for c in order[:count])
    tuned = finetune(module, prune_channels(variables, unit, pruned), clean, tune_key, config.finetune)
    # Fine-tuning can revive a pruned channel (a residual add passes gradient to a zeroed BN).
    repaired = prune_channels(tuned.variables, unit, pruned)
    return DefenseResult(repaired, info={
        "unit": unit.name, "activation": np.asarray(activation), "order": order.tolist(), "curve": curve,
        "pruned": pruned, "pruned_count": len(pruned), "train_loss": tuned.info["train_loss"],
    })
