"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, ICML 2023).

Unlearn the clean set (gradient ascent until clean accuracy <= 0.2): backdoor neurons
barely change, clean ones are disrupted. Then recover: learn a mask m in [0, 1] per
BatchNorm neuron of the UNLEARNED model (its weights frozen) that restores clean accuracy;
the neurons the recovery switches off (m < 0.7) are the backdoor's, and are pruned in the
ORIGINAL model. Details follow the authors' code: train-mode BN throughout, recovery loss
alpha * CE with alpha = 0.2, masks clipped to [0, 1] after every step, pruning sets the
BN weight γ of a neuron to 0 (its bias β stays).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.unlearning import gradient_ascent, minibatches
from bdjax.training import cross_entropy


@dataclasses.dataclass(frozen=True)
class RnpConfig:
    """SPEC "Baselines" / RNP's code: unlearning SGD lr 0.01 (momentum 0.9, wd 5e-4, gradient
    norm clipped at 20) for at most 20 epochs or until clean accuracy <= 0.2; recovery SGD lr
    0.2 (momentum 0.9) on the masks for 20 epochs with loss 0.2 * CE; prune masks < 0.7;
    batch size 128 (BackdoorBench)."""

    unlearn_lr: float = 0.01
    unlearn_max_accuracy: float = 0.2
    unlearn_epochs: int = 20
    mask_lr: float = 0.2
    mask_epochs: int = 20
    alpha: float = 0.2
    threshold: float = 0.7
    batch_size: int = 128


def learn_neuron_masks(module, variables, clean: Dataset, key, *, learning_rate: float = 0.2,
                       epochs: int = 20, alpha: float = 0.2, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per-BN-neuron masks {unit name: f32[C] in [0, 1]} minimising alpha * CE of the masked model
    (train mode; the model's own parameters frozen), starting from 1."""
    units = surgery.bn_units(module)
    masks = {u.name: jnp.ones(surgery.get_path(variables["params"], u.bn)["scale"].shape) for u in units}
    optimizer = optax.sgd(learning_rate, momentum=0.9)

    @jax.jit
    def step(masks, opt_state, batch_stats, images, labels):
        def loss_fn(masks):
            edits = {u.output: (lambda out, m=masks[u.name]: out * jnp.broadcast_to(m, out.shape)) for u in units}
            (logits, _), updates = surgery.apply_with_edits(
                module, {**variables, "batch_stats": batch_stats}, images, edits, train=True,
                mutable=["batch_stats"])
            return alpha * cross_entropy(logits, labels), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(masks)
        updates, opt_state = optimizer.update(grads, opt_state, masks)
        masks = jax.tree_util.tree_map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(masks, updates))
        return masks, opt_state, batch_stats

    opt_state, batch_stats = optimizer.init(masks), variables["batch_stats"]
    images = clean.floats()
    for batch in minibatches(len(clean), batch_size, epochs, key):
        masks, opt_state, batch_stats = step(masks, opt_state, batch_stats, images[batch], clean.labels[batch])
    return {name: np.asarray(m) for name, m in masks.items()}


def prune_by_mask(module, variables, masks: dict[str, np.ndarray], threshold: float) -> tuple[dict, dict]:
    """Set γ = 0 of every BN neuron whose mask is below ``threshold``; (variables, {unit: channels})."""
    pruned, params = {}, variables["params"]
    for unit in surgery.bn_units(module):
        channels = np.flatnonzero(masks[unit.name] < threshold)
        if channels.size:
            bn = dict(surgery.get_path(params, unit.bn))
            bn["scale"] = bn["scale"].at[jnp.asarray(channels)].set(0.0)
            params = surgery.set_path(params, unit.bn, bn)
            pruned[unit.name] = channels.tolist()
    return {**variables, "params": params}, pruned


@register("rnp", RnpConfig, kind="pruning",
          paper="Li et al., ICML 2023",
          summary="RNP: unlearn, learn neuron masks on the unlearned model, prune")
def rnp(module, variables, clean: Dataset, key, config: RnpConfig = RnpConfig()) -> DefenseResult:
    """Unlearn -> recover neuron masks -> prune low-mask neurons in the original model.

    ``info``: "unlearning" (steps, final clean accuracy, reached), "masks" ({unit: f32[C]}),
    "pruned" ({unit: channels}), "pruned_count".
    """
    surgery.require_batch_norm(variables, "RNP")
    check_clean_set(clean, "RNP")
    unlearn_key, mask_key = jax.random.split(key)
    steps_per_epoch = max(len(clean) // config.batch_size, 1)
    unlearned, unlearn_info = gradient_ascent(
        module, variables, clean, unlearn_key, learning_rate=config.unlearn_lr,
        max_accuracy=config.unlearn_max_accuracy, max_steps=config.unlearn_epochs * steps_per_epoch,
        batch_size=config.batch_size)
    masks = learn_neuron_masks(module, unlearned, clean, mask_key, learning_rate=config.mask_lr,
                               epochs=config.mask_epochs, alpha=config.alpha, batch_size=config.batch_size)
    repaired, pruned = prune_by_mask(module, variables, masks, config.threshold)
    return DefenseResult(repaired, info={
        "unlearning": {k: v for k, v in unlearn_info.items() if k != "accuracy_curve"},
        "masks": masks, "pruned": pruned, "pruned_count": sum(map(len, pruned.values())),
    })
