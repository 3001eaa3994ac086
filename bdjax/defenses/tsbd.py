"""TSBD: two-stage backdoor defense (neuron-weight-change reinitialisation + activeness-aware fine-tuning).

Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight
Changes and Backdoor Activeness" (NeurIPS 2024; slides in ``papers/tsbd-slides.txt``), with
the details of the authors' published code (SPEC, "Seed 004"):

Stage 1. Clean unlearning (gradient ascent on the clean set until clean accuracy <= 10%)
moves the weights of backdoor neurons the most (the paper's observation 1: the neuron weight
changes of clean and of poison unlearning are positively correlated). NWC of a conv output
channel = sum |unlearned - original| over its kernel; neurons are ranked across all
(non-shortcut) convs, and for the top n% the 70% of their sub-weights with the largest
|change| are set to zero in the ORIGINAL weights.

Stage 2. Fine-tune on the clean set with L = CE + lambda * ||grad_theta CE|| (observation 2:
backdoored models have larger gradient norms; penalising them keeps fine-tuning from
re-learning the backdoor). ``exact`` differentiates the penalty with JAX's second-order
gradients; ``approx`` is the authors' two-pass form g = (1 - a) g(theta) + a g(theta + r d),
d = g / ||g|| per tensor, a finite-difference Hessian-vector product for lambda = a * r.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import surgery
from bdjax.data import train_val_split
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.finetune import FinetuneConfig
from bdjax.defenses.unlearning import (
    accuracy,
    gradient_ascent,
    minibatches,
    train_mode_loss,
)
from bdjax.training import augment

PENALTIES = ("approx", "exact", "none")
# The authors sweep the reinitialised fraction n over 1% ... 90%.
REINIT_SWEEP = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class TsbdConfig:
    """TSBD defaults.

    Stage 1 (SPEC, "Seed 004", from the authors' code): SGD lr 1e-4 gradient ascent until
    clean accuracy <= 0.1; the top ``reinit_fraction`` of neurons by NWC get the
    ``subweight_ratio`` = 70% of their largest-change sub-weights zeroed. We add momentum 0.9,
    weight decay 5e-4 and gradient clipping at 20 (RNP's unlearning, which TSBD's code builds
    on) and a step cap ``unlearn_max_steps``. ``reinit_fraction = None`` chooses n from
    ``reinit_sweep`` on a held-out ``val_fraction`` of the clean set (never on ASR): the
    largest n whose clean validation accuracy after reinitialisation stays within
    ``max_val_drop`` of the original model's.

    Stage 2 (SPEC): 20 epochs, SGD lr 0.01 (``finetune``: our FT baseline's recipe, with
    momentum 0.9, weight decay 5e-4, cosine, random crops, batch 64), gradient-norm penalty ``penalty``:
    "approx" (the authors' code, alpha 0.7, radius 0.05, per-tensor norms), "exact" (the same
    objective, lambda = alpha * radius, differentiated exactly) or "none" (plain FT).
    """

    unlearn_lr: float = 1e-4
    unlearn_max_accuracy: float = 0.10
    unlearn_max_steps: int = 3000
    unlearn_batch_size: int = 128
    reinit_fraction: float | None = None
    reinit_sweep: tuple[float, ...] = REINIT_SWEEP
    subweight_ratio: float = 0.7
    val_fraction: float = 0.2
    max_val_drop: float = 0.2
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    penalty: str = "approx"
    alpha: float = 0.7
    radius: float = 0.05
    per_tensor: bool = True

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        fractions = self.reinit_sweep if self.reinit_fraction is None else (self.reinit_fraction,)
        if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"reinit fractions must be in (0, 1], got {fractions}")
        if not 0.0 < self.subweight_ratio <= 1.0:
            raise ValueError(f"subweight_ratio must be in (0, 1], got {self.subweight_ratio}")


# --------------------------------------------------------------------------- stage 1
def _reinit_units(module):
    units = tuple(u for u in module.conv_units() if not u.shortcut)
    if not units:
        raise ValueError("TSBD needs convolutions: module.conv_units() lists no non-shortcut conv")
    return units


def _kernel_pair(unit, original, unlearned):
    before = surgery.get_path(original["params"], unit.conv)["kernel"]
    after = surgery.get_path(unlearned["params"], unit.conv)["kernel"]
    if before.shape != after.shape:
        raise ValueError(f"conv {unit.name!r}: original kernel {before.shape} and unlearned "
                         f"kernel {after.shape} differ in shape")
    return before, after


def neuron_weight_change(module, original, unlearned) -> dict[str, jax.Array]:
    """NWC of every non-shortcut conv output channel: {unit name: f32[C_out]} = sum |Δkernel|."""
    changes = {}
    for unit in _reinit_units(module):
        before, after = _kernel_pair(unit, original, unlearned)
        changes[unit.name] = jnp.abs(after - before).reshape(-1, before.shape[-1]).sum(0)
    return changes


def rank_neurons(changes: dict[str, jax.Array]) -> list[tuple[str, int]]:
    """(unit name, channel) of every neuron, largest NWC first, ranked across all layers."""
    names = [name for name, c in changes.items() for _ in range(c.shape[0])]
    channels = [i for c in changes.values() for i in range(c.shape[0])]
    values = np.concatenate([np.asarray(c) for c in changes.values()])
    order = np.argsort(-values, kind="stable")
    return [(names[i], channels[i]) for i in order]


def reinitialize(module, original, unlearned, fraction: float, subweight_ratio: float = 0.7,
                 ranking: list[tuple[str, int]] | None = None) -> tuple[dict, dict[str, list[int]]]:
    """Zero, in ``original``, the ``subweight_ratio`` largest-|Δw| sub-weights of the top
    ``fraction`` of neurons by NWC. Returns (new variables, {unit name: reinitialised channels})."""
    if ranking is None:
        ranking = rank_neurons(neuron_weight_change(module, original, unlearned))
    top = ranking[:int(fraction * len(ranking))]
    chosen = {u.name: sorted(c for n, c in top if n == u.name) for u in _reinit_units(module)}
    params = original["params"]
    for unit in _reinit_units(module):
        if not chosen[unit.name]:
            continue
        before, after = _kernel_pair(unit, original, unlearned)
        change = jnp.abs(after - before).reshape(-1, before.shape[-1])  # [fan_in, C_out]
        count = int(subweight_ratio * change.shape[0])
        rank = jnp.argsort(jnp.argsort(-change, axis=0, stable=True), axis=0)  # 0 = largest change
        neuron = jnp.zeros((before.shape[-1],), bool).at[jnp.asarray(chosen[unit.name])].set(True)
        zero = (rank < count) & neuron[None, :]
        conv = dict(surgery.get_path(params, unit.conv))
        conv["kernel"] = jnp.where(zero.reshape(before.shape), 0.0, before)
        params = surgery.set_path(params, unit.conv, conv)
    return {**original, "params": params}, {k: v for k, v in chosen.items() if v}


def choose_fraction(module, original, unlearned, val: Dataset, fractions, max_drop: float,
                    ranking=None) -> tuple[float, np.ndarray]:
    """The largest n of ``fractions`` whose reinitialised model keeps clean validation accuracy
    within ``max_drop`` of the original's (the smallest n if none does), and the accuracies
    f32[len(fractions)]. The candidate models are evaluated together with vmap."""
    fractions = sorted(fractions)
    if ranking is None:
        ranking = rank_neurons(neuron_weight_change(module, original, unlearned))
    candidates = [reinitialize(module, original, unlearned, f, ranking=ranking)[0] for f in fractions]
    # The original model rides along as entry 0: one compiled, vmapped evaluation for all.
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), original, *candidates)
    images, labels = jnp.asarray(val.floats()), jnp.asarray(val.labels)
    evaluate = jax.jit(jax.vmap(functools.partial(accuracy, module), in_axes=(0, None, None)))
    reference, *accuracies = np.asarray(evaluate(stacked, images, labels)).tolist()
    accuracies = np.asarray(accuracies, np.float32)
    kept = [f for f, a in zip(fractions, accuracies) if a >= reference - max_drop]
    return (max(kept) if kept else fractions[0]), accuracies


# --------------------------------------------------------------------------- stage 2
def gradient_norm(grads, per_tensor: bool = True) -> jax.Array:
    """sum over tensors of ||g_t|| (``per_tensor``), or the global norm ||g||."""
    squares = [jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)]
    if per_tensor:
        return sum(jnp.sqrt(s + _NORM_EPS) for s in squares)
    return jnp.sqrt(sum(squares) + _NORM_EPS)


def _unit_direction(grads, per_tensor: bool):
    if per_tensor:
        return jax.tree_util.tree_map(lambda g: g / (jnp.linalg.norm(g.ravel()) + _NORM_EPS), grads)
    return jax.tree_util.tree_map(lambda g: g / (optax.global_norm(grads) + _NORM_EPS), grads)


def penalized_gradient_exact(loss_fn, params, strength: float, per_tensor: bool = True):
    """∇θ [L(θ) + strength·‖∇θ L(θ)‖] by differentiating through the gradient (Hessian-vector
    product). loss_fn(params) -> (loss, aux). Returns (gradient, loss, aux at θ)."""
    def objective(params):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss + strength * gradient_norm(grads, per_tensor), (loss, aux)

    grads, (loss, aux) = jax.grad(objective, has_aux=True)(params)
    return grads, loss, aux


def penalized_gradient_approx(loss_fn, params, alpha: float, radius: float, per_tensor: bool = True):
    """The authors' two-pass form: (1 - alpha)·g(θ) + alpha·g(θ + radius·g/‖g‖), which
    approximates the exact gradient with strength = alpha·radius. Returns (gradient, loss, aux)."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    shifted_params = jax.tree_util.tree_map(lambda p, d: p + radius * d, params,
                                            _unit_direction(grads, per_tensor))
    shifted, _ = jax.grad(loss_fn, has_aux=True)(shifted_params)
    return jax.tree_util.tree_map(lambda g, s: (1.0 - alpha) * g + alpha * s, grads, shifted), loss, aux


def penalized_gradient(loss_fn, params, config: TsbdConfig):
    """The stage-2 gradient the config asks for: (gradient, loss, aux)."""
    if config.penalty == "exact":
        return penalized_gradient_exact(loss_fn, params, config.alpha * config.radius, config.per_tensor)
    if config.penalty == "approx":
        return penalized_gradient_approx(loss_fn, params, config.alpha, config.radius, config.per_tensor)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, loss, aux


def activeness_aware_finetune(module, variables, clean: Dataset, key, config: TsbdConfig = TsbdConfig()):
    """Stage 2: fine-tune every parameter on ``clean`` with the gradient-norm penalty.

    Returns (new variables, mean loss per epoch)."""
    tune = config.finetune
    steps_per_epoch = len(clean) // min(tune.batch_size, len(clean))
    optimizer = optax.chain(
        optax.add_decayed_weights(tune.weight_decay),
        optax.sgd(optax.cosine_decay_schedule(tune.learning_rate, max(tune.epochs * steps_per_epoch, 1)),
                  momentum=tune.momentum))

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels, step_key):
        images = augment(step_key, images.astype(jnp.float32) / 255.0, tune.crop_padding, False)
        def loss_fn(params):
            return train_mode_loss(module, params, batch_stats, images, labels)

        grads, loss, batch_stats = penalized_gradient(loss_fn, params, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = optimizer.init(params)
    order_key, augment_key = jax.random.split(key)
    losses = []
    for index, batch in enumerate(minibatches(len(clean), tune.batch_size, tune.epochs, order_key)):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, clean.images[batch],
                                                    clean.labels[batch], jax.random.fold_in(augment_key, index))
        losses.append(loss)
    per_epoch = np.asarray(jax.device_get(losses)).reshape(tune.epochs, -1).mean(1) if losses else np.zeros(0)
    new = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    return new, per_epoch


# --------------------------------------------------------------------------- the defense
@register("tsbd", TsbdConfig, kind="pruning",
          paper="Lin et al., NeurIPS 2024",
          summary="TSBD: NWC-based reinitialisation + gradient-norm-penalised fine-tuning")
def tsbd(module, variables, clean: Dataset, key, config: TsbdConfig = TsbdConfig()) -> DefenseResult:
    """Stage 1 (clean unlearning, NWC ranking, zero-reinitialisation), then stage 2 (fine-tuning).

    ``info``: "nwc" ({unit: f32[C]}), "ranking" ([(unit, channel)], largest NWC first),
    "unlearning" (steps, final clean accuracy, whether ≤ target), "fraction" (n used),
    "sweep" (n -> clean validation accuracy when n was chosen), "reinitialized" ({unit:
    channels}), "stage1_variables" (the reinitialised model), "stage2_loss" (per epoch),
    "seconds" per stage.
    """
    check_clean_set(clean, "TSBD", min_size=2)
    unlearn_key, split_key, tune_key = jax.random.split(key, 3)
    started = time.perf_counter()
    if config.reinit_fraction is None:
        fit, val = train_val_split(clean, config.val_fraction, split_key)
    else:
        fit, val = clean, None
    unlearned, unlearn_info = gradient_ascent(
        module, variables, fit, unlearn_key, learning_rate=config.unlearn_lr,
        max_accuracy=config.unlearn_max_accuracy, max_steps=config.unlearn_max_steps,
        batch_size=config.unlearn_batch_size)
    changes = neuron_weight_change(module, variables, unlearned)
    ranking = rank_neurons(changes)
    sweep = {}
    fraction = config.reinit_fraction
    if fraction is None:
        fraction, accuracies = choose_fraction(module, variables, unlearned, val, config.reinit_sweep,
                                               config.max_val_drop, ranking)
        sweep = dict(zip(sorted(config.reinit_sweep), map(float, accuracies)))
    reinitialized, chosen = reinitialize(module, variables, unlearned, fraction, config.subweight_ratio, ranking)
    stage1_seconds = time.perf_counter() - started
    repaired, losses = activeness_aware_finetune(module, reinitialized, clean, tune_key, config)
    return DefenseResult(repaired, info={
        "nwc": {name: np.asarray(c) for name, c in changes.items()},
        "ranking": ranking,
        "unlearning": {k: v for k, v in unlearn_info.items() if k != "accuracy_curve"},
        "fraction": fraction,
        "sweep": sweep,
        "reinitialized": chosen,
        "reinitialized_count": sum(map(len, chosen.values())),
        "stage1_variables": reinitialized,
        "stage2_loss": losses,
        "seconds": {"stage1": stage1_seconds, "stage2": time.perf_counter() - started - stage1_seconds},
    })
