"""ANP: adversarial neuron pruning.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021
(official code: csdongxian/ANP_backdoor). Every BatchNorm neuron k gets a mask m_k ∈ [0, 1]
and multiplicative perturbations δ_k, ξ_k ∈ [−eps, eps] of its scale and bias:

    y_k = γ_k (m_k + δ_k) x̂_k + β_k (1 + ξ_k).

Backdoor neurons are the ones whose small perturbation flips predictions. Each iteration
draws (δ, ξ) uniformly, takes a sign-gradient ascent step of the clean cross-entropy on
them, then moves the masks down α · L(m) + (1 − α) · L(m + δ, ξ). Neurons whose mask ends
below a threshold have γ zeroed (ANP prunes the scale only, which is what m_k = 0 means).

As in the official code (and BackdoorBench's ``defense/anp.py``), the ascent step of size
eps / steps is *not* clipped back into [−eps, eps]: after one step from a uniform start the
perturbation lies in [−2 eps, 2 eps] (``AnpConfig.clip_noise`` restores the clipped L∞ PGD).
The train-mode BatchNorm of the mask optimisation computes the batch variance in two passes,
E[(x − E x)²], as PyTorch does; Flax's default E[x²] − (E x)² (``use_fast_variance``) makes
the mask gradient several times less accurate (issue 31). Only this optimisation is
affected: the trained model and its eval-mode inference are not (``exact_batch_variance``).

BackdoorBench's ANP picks that threshold by looking at test ASR; here it is either fixed or
chosen on a held-out part of the defender's clean set (``AnpConfig.threshold``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import loops, surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.channel_lipschitz import bn_units_or_raise
from bdjax.models.base import ConvUnit
from bdjax.training import augment, cross_entropy

Masks = dict  # {unit name: f32[C]}


@dataclasses.dataclass(frozen=True)
class AnpConfig:
    """Defaults from ANP's official ``optimize_mask_cifar.py`` unless noted.

    eps 0.4, steps 1 (``--anp-eps``, ``--anp-steps``; noise lr = eps / steps), alpha 0.2
    (``--anp-alpha``), mask lr 0.2 with SGD momentum 0.9, 2000 iterations (``--nb-iter``),
    batch 128 (the tiny defense sets here fit in one batch), random crop (padding 4) and the
    dataset's flips, as its ``transform_train``.
    batch_statistics: BN normalises with the batch's statistics while masks are learned (the
        official code calls ``model.train()``); False uses the running statistics.
    threshold: prune neurons with mask < threshold. None (default): choose it on clean
        validation data -- the defense set is split into a fit part (masks) and a validation
        part (``val_fraction``, stratified by class); the largest candidate in ``thresholds``
        whose validation ACC is within ``max_acc_drop`` of the unpruned model's is used. A
        number (ANP's paper prunes below 0.2) uses all clean images for the masks.
    thresholds: the official pruning script's grid, 0.05 ... 0.90 in steps of 0.05.
    max_acc_drop: 0.1, the clean-accuracy budget of fine-pruning's stopping rule (as
        BackdoorBench's FP); not from ANP, which has no clean-data rule.
    clip_noise: False (the official code): the perturbation after the ascent steps is not
        clipped back into [−eps, eps]. True: bdjax's earlier clipped PGD.
    exact_batch_variance: True: two-pass batch variance in the train-mode BatchNorm while
        masks are learned (PyTorch's); False: Flax's fast E[x²] − (E x)².
    """

    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    crop_padding: int = 4
    batch_statistics: bool = True
    threshold: float | None = None
    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 19))
    val_fraction: float = 0.5
    max_acc_drop: float = 0.1
    clip_noise: bool = False
    exact_batch_variance: bool = True

    def __post_init__(self):
        if self.eps < 0 or self.steps < 1 or self.iterations < 0 or self.batch_size < 1:
            raise ValueError("need eps >= 0, steps >= 1, iterations >= 0 and batch_size >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.threshold is None and not self.thresholds:
            raise ValueError("thresholds must not be empty when threshold is None")


# --------------------------------------------------------------------------- the masked network
def masked_params(params, units: tuple[ConvUnit, ...], masks: Masks, scale_noise: Masks | None = None,
                  bias_noise: Masks | None = None) -> dict:
    """params with every unit's BN γ ← γ · (m + δ) and β ← β · (1 + ξ) (ANP's NoisyBatchNorm2d)."""
    for u in units:
        bn = surgery.get_path(params, u.bn)
        coeff_scale = masks[u.name] if scale_noise is None else masks[u.name] + scale_noise[u.name]
        coeff_bias = 1.0 if bias_noise is None else 1.0 + bias_noise[u.name]
        params = surgery.set_path(params, u.bn, {**bn, "scale": bn["scale"] * coeff_scale,
                                                 "bias": bn["bias"] * coeff_bias})
    return params


def two_pass_batch_norm(next_fun, args, kwargs, context):
    """A ``flax.linen.intercept_methods`` interceptor: every train-mode ``nn.BatchNorm`` (over
    the last axis) normalises with the two-pass batch variance E[(x − E x)²], as PyTorch, in
    place of Flax's E[x²] − (E x)². It does not update running statistics (ANP drops them)."""
    bn = context.module
    if (not isinstance(bn, nn.BatchNorm) or context.method_name != "__call__" or bn.use_running_average
            or bn.axis != -1 or kwargs.get("use_running_average") or len(args) != 1):
        return next_fun(*args, **kwargs)
    x = args[0]
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(variance + bn.epsilon)
    if bn.use_scale:
        y = y * bn.get_variable("params", "scale").reshape(mean.shape)
    if bn.use_bias:
        y = y + bn.get_variable("params", "bias").reshape(mean.shape)
    return y


def _logits(module, params, batch_stats, images, batch_statistics: bool, exact_variance: bool = True):
    variables = {"params": params, "batch_stats": batch_stats}
    if batch_statistics:
        # Running statistics are not kept: pruning edits the original model.
        with nn.intercept_methods(two_pass_batch_norm) if exact_variance else contextlib.nullcontext():
            logits, _ = module.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits
    return module.apply(variables, images, train=False)


def adversarial_noise(loss_fn, like, key, eps: float, steps: int = 1, clip: bool = False):
    """A perturbation of the shape of pytree ``like`` that (approximately) maximises
    ``loss_fn``: uniform start in [−eps, eps], then ``steps`` sign-gradient ascent steps of
    size eps / steps (ANP's step 1). As the official code, the steps are not clipped, so
    the result lies in [−2 eps, 2 eps]; ``clip`` projects each step back into [−eps, eps]."""
    leaves, tree = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    noise = jax.tree_util.tree_unflatten(tree, [jax.random.uniform(k, jnp.shape(x), minval=-eps, maxval=eps)
                                                for k, x in zip(keys, leaves)])
    bound = eps if clip else jnp.inf
    for _ in range(steps):
        grads = jax.grad(loss_fn)(noise)
        noise = jax.tree_util.tree_map(lambda n, g: jnp.clip(n + eps / steps * jnp.sign(g), -bound, bound),
                                       noise, grads)
    return jax.lax.stop_gradient(noise)


def learn_masks(params, batch_stats, images, labels, key, *, module, units: tuple[ConvUnit, ...],
                config: AnpConfig, flip: bool) -> tuple[Masks, dict]:
    """ANP's mask optimisation (Alg. 1): ``config.iterations`` of ``mask_iteration`` in
    ``bdjax.loops.scan`` (compiled once per model, config and clean-set shape).

    images: f32[N, H, W, C], labels: int32[N]. Returns ``(masks {unit: f32[C]} in [0, 1],
    {"natural_loss", "robust_loss": f32[iterations]})``.
    """
    masks = {u.name: jnp.ones_like(surgery.get_path(params, u.bn)["scale"]) for u in units}
    keys = jax.random.split(key, config.iterations)
    iteration = functools.partial(mask_iteration, module=module, units=units, config=config, flip=flip)
    (masks, _), history = loops.scan(iteration, (masks, _mask_optimizer(config).init(masks)), keys,
                                     consts=(params, batch_stats, jnp.asarray(images), jnp.asarray(labels)))
    return masks, history


def _mask_optimizer(config: AnpConfig) -> optax.GradientTransformation:
    return optax.sgd(config.mask_lr, momentum=config.momentum)


def _masked_loss(masks, scale_noise, bias_noise, x, y, params, batch_stats, *, module, units, config: AnpConfig):
    return cross_entropy(_logits(module, masked_params(params, units, masks, scale_noise, bias_noise),
                                 batch_stats, x, config.batch_statistics, config.exact_batch_variance), y)


def mask_iteration(data, carry, key, *, module, units: tuple[ConvUnit, ...], config: AnpConfig, flip: bool):
    """One ANP iteration: ``data = (params, batch_stats, images f32[N, ...], labels int32[N])``,
    ``carry = (masks, optimizer state)``, ``key`` draws the batch, augmentation and noise."""
    params, batch_stats, images, labels = data
    masks, opt_state = carry
    count = images.shape[0]
    loss = functools.partial(_masked_loss, params=params, batch_stats=batch_stats, module=module, units=units,
                             config=config)
    batch_key, augment_key, noise_key = jax.random.split(key, 3)
    index = jax.random.permutation(batch_key, count)[:min(config.batch_size, count)]
    x = augment(augment_key, images[index], config.crop_padding, flip)
    y = labels[index]
    # Step 1: the worst perturbation from a uniform start in the eps-box (unclipped: up to 2 eps).
    noise = adversarial_noise(lambda noise: loss(masks, *noise, x, y), (masks, masks), noise_key,
                              config.eps, config.steps, config.clip_noise)

    # Step 2: masks down α · natural + (1 − α) · robust loss, then back into [0, 1].
    def mask_loss(masks):
        natural = loss(masks, None, None, x, y)
        robust = loss(masks, *noise, x, y) if config.eps > 0 else 0.0
        return config.alpha * natural + (1.0 - config.alpha) * robust, (natural, robust)

    (_, (natural, robust)), grads = jax.value_and_grad(mask_loss, has_aux=True)(masks)
    updates, opt_state = _mask_optimizer(config).update(grads, opt_state, masks)
    masks = jax.tree_util.tree_map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(masks, updates))
    return (masks, opt_state), {"natural_loss": natural, "robust_loss": jnp.asarray(robust, jnp.float32)}


# --------------------------------------------------------------------------- pruning
def keep_masks(masks: Masks, threshold) -> Masks:
    """{unit: f32[C]}: 0 for neurons with mask < threshold (pruned), 1 otherwise."""
    return {name: (m >= threshold).astype(jnp.float32) for name, m in masks.items()}


@functools.partial(jax.jit, static_argnames=("module", "units"))
def _accuracy_per_threshold(params, batch_stats, images, labels, masks, thresholds, *, module, units):
    """f32[T]: eval-mode accuracy on images f32[N, ...] after pruning at each of thresholds f32[T]."""
    def accuracy(threshold):
        pruned = masked_params(params, units, keep_masks(masks, threshold))
        logits = module.apply({"params": pruned, "batch_stats": batch_stats}, images, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == labels)
    return jax.vmap(accuracy)(thresholds)


def choose_threshold(module, variables, units, masks: Masks, val: Dataset, config: AnpConfig) -> tuple[float, dict]:
    """The largest threshold whose accuracy on ``val`` (clean, held out from mask learning)
    stays within ``config.max_acc_drop`` of the unpruned model's. Every candidate is
    evaluated in one vmapped call. Returns ``(threshold, {threshold: val ACC})``."""
    candidates = (0.0, *config.thresholds)  # 0: nothing pruned
    acc = np.asarray(_accuracy_per_threshold(variables["params"], variables["batch_stats"], val.floats(),
                                             val.labels, masks, jnp.asarray(candidates, jnp.float32),
                                             module=module, units=units))
    allowed = [t for t, a in zip(candidates, acc) if a >= acc[0] - config.max_acc_drop - 1e-6]
    return max(allowed), {t: float(a) for t, a in zip(candidates, acc)}


def split_fit_val(clean: Dataset, val_fraction: float, key) -> tuple[Dataset, Dataset]:
    """Stratified split: after a random shuffle, images are ordered by class and every
    image whose running position crosses a multiple of 1/val_fraction goes to validation,
    so both parts cover the classes as evenly as the set allows. Both parts are non-empty."""
    check_clean_set(clean, "ANP's threshold selection (a fit and a validation part)", min_size=2)
    shuffled = np.asarray(jax.random.permutation(key, len(clean)))
    order = shuffled[np.argsort(clean.labels[shuffled], kind="stable")]
    position = np.arange(1, len(clean) + 1)
    to_val = np.floor(position * val_fraction) > np.floor((position - 1) * val_fraction)
    if to_val.all() or not to_val.any():  # only possible for tiny sets and extreme fractions
        to_val = position == len(clean)
    return clean.subset(np.sort(order[~to_val])), clean.subset(np.sort(order[to_val]))


@register("anp", AnpConfig, kind="pruning",
          paper="Wu & Wang, NeurIPS 2021",
          summary="ANP: prune BN neurons whose masks shrink under adversarial neuron perturbation")
def anp(module, variables, clean: Dataset, key, config: AnpConfig = AnpConfig()) -> DefenseResult:
    """Learn ANP masks on the clean set and zero γ of the neurons with mask below the threshold."""
    units = bn_units_or_raise(module, variables, "ANP")
    check_clean_set(clean, "ANP")
    split_key, mask_key = jax.random.split(key)
    if config.threshold is None:
        fit, val = split_fit_val(clean, config.val_fraction, split_key)
    else:
        fit, val = clean, None
    masks, history = learn_masks(variables["params"], variables["batch_stats"], fit.floats(), fit.labels,
                                 mask_key, module=module, units=units, config=config,
                                 flip=fit.info.flip_augment)
    if val is None:
        threshold, val_accuracy = config.threshold, {}
    else:
        threshold, val_accuracy = choose_threshold(module, variables, units, masks, val, config)
    keep = keep_masks(masks, threshold)
    new_params = masked_params(variables["params"], units, keep)
    pruned = {name: [int(c) for c in np.flatnonzero(np.asarray(k) == 0)] for name, k in keep.items()}
    flat = np.concatenate([np.asarray(m).ravel() for m in masks.values()])
    return DefenseResult({**variables, "params": new_params}, info={
        "masks": jax.device_get(masks), "threshold": threshold, "val_accuracy": val_accuracy,
        "fit_size": len(fit), "val_size": 0 if val is None else len(val),
        "pruned": pruned, "pruned_count": sum(map(len, pruned.values())),
        # The learned masks' spread (all neurons), so that a record shows how far they moved.
        "mask_count": int(flat.size), "mask_median": float(np.median(flat)),
        "mask_q10": float(np.quantile(flat, 0.1)), "mask_q90": float(np.quantile(flat, 0.9)),
        "history": jax.device_get(history),
    })
