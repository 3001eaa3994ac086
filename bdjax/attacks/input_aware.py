"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a trigger generated per input.

A trigger generator G and a mask generator M (encoder-decoder conv nets) make, for each
image x, a pattern G(x) and a soft mask m(x) = threshold(M(x)); the triggered image is
x + (G(x) − x) · m(x). They are trained together with the classifier, so this attack has its
own training loop, ``train_input_aware``; once trained, the trigger is a pure function of
the input and ``InputAware`` (holding both generators' variables) is applied, saved and
loaded like any other attack (``poison_test_set``, defenses, ``checkpoint.load``).

Training, after the authors' release (input-aware-backdoor-attack-release, train.py):

1. mask pre-training (M alone, ``mask_epochs`` = 25): λ_norm · mean(relu(m(x₁) − density))
   + λ_div · diversity(x₁, x₂, m(x₁), m(x₂)), λ_norm = 100, density = 0.032, λ_div = 1;
   Adam lr 1e-2, β = (0.5, 0.9), lr × 0.1 at epochs 10 and 20. M is frozen afterwards.
2. joint training of classifier and G: of each batch (x₁, y₁), the first ``attack_rate`` (0.1)
   get their own trigger and the target label (attack mode), the next ``cross_rate`` (0.1) the
   trigger of *another* image x₂ and keep their label (cross mode, so a trigger only works
   on the image it was made for), the rest stay clean; loss = cross-entropy +
   λ_div · diversity(x₁, x₂, G(x₁), G(x₂)), diversity = mean(‖x₁ − x₂‖ / ‖G(x₁) − G(x₂)‖)
   (per-image RMS distances). G: Adam lr 1e-2, β = (0.5, 0.9), × 0.1 at epochs 200, 300,
   400, 500. The classifier: SGD lr 1e-2, momentum 0.9, weight decay 5e-4 (× 0.1 at epochs
   100 .. 400 of 600), random crop 5 px (and rotation 10°) on both batches.

``bdjax train --attack input-aware`` (``runs.train_runs`` -> ``train_for_run``) trains the
classifier with the run's recipe instead (``--recipe``, ``--epochs``, ...), takes
``--poison-rate`` as the attack rate and ``--attack-arg`` for the other ``InputAwareConfig``
fields, and saves an ordinary run (the generators in ``variables.npz`` under ``attack/``); it
keeps per-epoch training state like any run, so a killed ``bdjax train`` continues with ``--resume``.

Deviations, mostly CPU budgets: the number of epochs is the caller's (the paper trains
600); the classifier's step decays are not applied (they fall at epoch 100 and later;
``classifier_config`` gives a constant rate, and any ``TrainConfig`` may be passed); no
random rotation; G and M run once on the concatenation of the two batches, so their
BatchNorm sees one batch instead of two; the generators' width (``channels``, 32 in the paper)
is a parameter so tests can use a narrower one; RMS distances are floored at 1e-6 (two equal
saturated masks would give sqrt'(0) = inf, a NaN loss); the generators' BatchNorm is bdjax's
(PyTorch momentum 0.1). Generators: per resolution two 3×3
conv-BN-ReLU blocks, then 2×2 max-pooling (32, 64, 128 channels), a middle block, and
mirrored bilinear ×2 upsampling blocks; output tanh / 2 + 0.5 in [0, 1]; the mask's
threshold is tanh(20 m − 10) / 2 + 0.5.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from bdjax.attacks.base import Attack, TargetMap, check_images, register
from bdjax.data.dataset import Dataset
from bdjax.models.base import batch_norm
# Module imports: bdjax.training imports bdjax.checkpoint, which imports the attacks.
from bdjax import checkpoint, training

_EPSILON = 1e-7  # the authors' EPSILON (diversity loss, output scaling)


class Generator(nn.Module):
    """Encoder-decoder of the paper: f32[N, H, W, C] in [0, 1] -> f32[N, H, W, out_channels] in [0, 1].

    H and W must be divisible by 2 ** depth."""

    out_channels: int
    channels: int = 32
    depth: int = 3

    @nn.compact
    def __call__(self, images, train: bool = False):
        def block(x, width, name, relu=True):
            x = nn.Conv(width, (3, 3), padding=1, name=f"{name}_conv")(x)
            x = batch_norm(train, f"{name}_bn")(x)
            return nn.relu(x) if relu else x

        x, width = images, self.channels
        for level in range(self.depth):
            x = block(x, width, f"down{level}_a")
            x = block(x, width, f"down{level}_b")
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            if level < self.depth - 1:
                width *= 2
        x = block(x, width, "middle")
        for level in range(self.depth):
            n, h, w, c = x.shape
            x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "bilinear")
            x = block(x, width, f"up{level}_a")
            last = level == self.depth - 1
            width = self.out_channels if last else width // 2
            x = block(x, width, f"up{level}_b", relu=not last)
        return jnp.tanh(x) / (2 + _EPSILON) + 0.5


def threshold(mask):
    """The paper's soft binarisation of the mask generator's output (in [0, 1])."""
    return jnp.tanh(mask * 20 - 10) / (2 + _EPSILON) + 0.5


def blend(images, patterns, masks):
    """x + (pattern − x) · mask. images, patterns: f32[N, H, W, C]; masks: f32[N, H, W, 1]."""
    return images + (patterns - images) * masks


@dataclasses.dataclass(frozen=True)
class InputAwareConfig:
    """The attack's side of the training (defaults: the authors' release, see the module docstring).

    attack_rate / cross_rate: fraction of each batch in attack / cross mode (p_attack, p_cross).
    lambda_div, lambda_norm, mask_density: the loss weights and the mask's target density.
    mask_epochs: mask generator pre-training epochs (25).
    generator_lr, mask_lr: Adam rates (β = 0.5, 0.9); generator_milestones, mask_milestones:
    epochs after which they are multiplied by 0.1.
    channels: the generators' first width (32).
    """

    attack_rate: float = 0.1
    cross_rate: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    mask_epochs: int = 25
    generator_lr: float = 1e-2
    mask_lr: float = 1e-2
    generator_milestones: tuple[int, ...] = (200, 300, 400, 500)
    mask_milestones: tuple[int, ...] = (10, 20)
    channels: int = 32

    def __post_init__(self):
        for name in ("attack_rate", "cross_rate", "mask_density"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.attack_rate + self.cross_rate > 1.0:
            raise ValueError(f"attack_rate + cross_rate must be <= 1, got {self.attack_rate} + {self.cross_rate}")
        if self.lambda_div < 0 or self.lambda_norm < 0:
            raise ValueError("lambda_div and lambda_norm must be >= 0")
        if self.mask_epochs < 0 or self.channels < 1:
            raise ValueError("mask_epochs must be >= 0 and channels >= 1")
        if not (self.generator_lr > 0 and self.mask_lr > 0):
            raise ValueError("generator_lr and mask_lr must be > 0")


def classifier_config(epochs: int, batch_size: int = 128) -> training.TrainConfig:
    """The paper's classifier optimiser (SGD 1e-2, momentum 0.9, weight decay 5e-4, random crop
    5 px), its step decays (epochs 100-400) left out: see the module docstring."""
    return training.TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", learning_rate=1e-2,
                       momentum=0.9, weight_decay=5e-4, schedule="constant", crop_padding=5)


@register
@struct.dataclass
class InputAware(Attack):
    """The trained generators: ``apply(x)`` = x + (G(x) − x) · threshold(M(x)), eval-mode BatchNorm.

    ``generator`` / ``mask_generator``: Flax variables ({"params", "batch_stats"}) of
    ``Generator(C, channels)`` and ``Generator(1, channels)``. Built by ``train_input_aware``
    (``create`` refuses: an untrained generator would plant nothing sensible).
    """

    generator: Any
    mask_generator: Any
    channels: int = struct.field(pytree_node=False, default=32)

    name = "input-aware"

    @classmethod
    def create(cls, key, image_shape=(32, 32, 3), *, cross_rate: float = 0.1, lambda_div: float = 1.0,
               lambda_norm: float = 100.0, mask_density: float = 0.032, mask_epochs: int = 25,
               generator_lr: float = 1e-2, mask_lr: float = 1e-2, channels: int = 32):
        """Not constructible alone. The keyword arguments are ``InputAwareConfig``'s (the CLI's
        ``--attack-arg``), checked by ``bdjax train --attack input-aware``."""
        raise ValueError(
            "input-aware's trigger generator is trained together with the classifier, so it cannot be "
            "made before training: train with `bdjax train --attack input-aware` (runs.train_run) or "
            "bdjax.attacks.input_aware.train_input_aware(module, dataset, target, key)")

    def modules(self, channels_in: int) -> tuple[Generator, Generator]:
        return Generator(channels_in, self.channels), Generator(1, self.channels)

    def patterns_and_masks(self, images):
        """(patterns f32[N, H, W, C], masks f32[N, H, W, 1]) of images f32[N, H, W, C]."""
        pattern_net, mask_net = self.modules(images.shape[-1])
        patterns = pattern_net.apply(self.generator, images, train=False)
        masks = threshold(mask_net.apply(self.mask_generator, images, train=False))
        return patterns, masks

    def apply(self, images, key=None):
        check_images(images)
        batch = images[None] if images.ndim == 3 else images
        out = blend(batch, *self.patterns_and_masks(batch))
        out = jnp.clip(out, 0.0, 1.0).astype(images.dtype)
        return out[0] if images.ndim == 3 else out

    def apply_cross(self, images, others):
        """Cross mode: each image with the trigger generated for the matching image of ``others``."""
        check_images(images)
        check_images(others, "others")
        return jnp.clip(blend(images, *self.patterns_and_masks(others)), 0.0, 1.0)


def diversity(images1, images2, outputs1, outputs2):
    """mean over the batch of RMS(x₁ − x₂) / (RMS(G(x₁) − G(x₂)) + ε): small when different
    inputs get different triggers (the paper's L_div)."""
    def rms(a, b):
        # Floored so that two equal outputs (a saturated mask) give a finite gradient, not sqrt'(0).
        return jnp.sqrt(jnp.maximum(jnp.mean((a - b) ** 2, axis=(1, 2, 3)), 1e-12))
    return jnp.mean(rms(images1, images2) / (rms(outputs1, outputs2) + _EPSILON))


def _adam(lr: float, milestones, steps_per_epoch: int):
    schedule = optax.piecewise_constant_schedule(lr, {m * steps_per_epoch: 0.1 for m in milestones})
    return optax.adam(schedule, b1=0.5, b2=0.9)


class _MaskState(struct.PyTreeNode):
    variables: Any
    opt_state: Any


def _mask_step(net, optimizer, config: InputAwareConfig, state: _MaskState, images1, images2):
    def loss_fn(params):
        both = jnp.concatenate([images1, images2])
        out, updates = net.apply({"params": params, "batch_stats": state.variables["batch_stats"]}, both,
                                 train=True, mutable=["batch_stats"])
        masks1, masks2 = jnp.split(threshold(out), 2)
        norm = jnp.mean(nn.relu(masks1 - config.mask_density))
        div = diversity(images1, images2, masks1, masks2)
        return config.lambda_norm * norm + config.lambda_div * div, (updates["batch_stats"], norm, div)

    params = state.variables["params"]
    (loss, (stats, norm, div)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    variables = {"params": optax.apply_updates(params, updates), "batch_stats": stats}
    return _MaskState(variables, opt_state), {"loss": loss, "norm": norm, "diversity": div}


class _JointState(struct.PyTreeNode):
    classifier_params: Any
    classifier_stats: Any
    generator: Any
    classifier_opt: Any
    generator_opt: Any


def _joint_step(module, pattern_net, mask_net, classifier_opt, generator_opt, target: TargetMap,
                config: InputAwareConfig, counts: tuple[int, int], crop_padding: int, flip: bool,
                state: _JointState, mask_variables, images1, labels1, images2, key):
    """One step of the joint training. images: uint8[B, H, W, C]; labels1: int32[B]."""
    num_bd, num_cross = counts
    pairs = min(num_bd, num_cross)  # the authors pair x₁[:bd] with x₂[bd:2 bd], with bd == cross
    key1, key2 = jax.random.split(key)
    x1 = training.augment(key1, images1.astype(jnp.float32) / 255.0, crop_padding, flip)
    x2 = training.augment(key2, images2.astype(jnp.float32) / 255.0, crop_padding, flip)
    # Attack mode: x₁[:bd] with its own trigger; cross mode: x₁[bd:bd+cross] with x₂'s.
    sources = jnp.concatenate([x1[:num_bd], x2[num_bd:num_bd + num_cross]])
    masks = threshold(mask_net.apply(mask_variables, sources, train=False))
    targets = jnp.concatenate([target(labels1[:num_bd]), labels1[num_bd:]])

    def loss_fn(classifier_params, generator_params):
        patterns, updates = pattern_net.apply(
            {"params": generator_params, "batch_stats": state.generator["batch_stats"]}, sources,
            train=True, mutable=["batch_stats"])
        inputs = jnp.concatenate([blend(x1[:num_bd + num_cross], patterns, masks), x1[num_bd + num_cross:]])
        if state.classifier_stats:
            logits, c_updates = module.apply({"params": classifier_params, "batch_stats": state.classifier_stats},
                                             inputs, train=True, mutable=["batch_stats"])
            classifier_stats = c_updates["batch_stats"]
        else:
            logits, classifier_stats = module.apply({"params": classifier_params}, inputs, train=True), {}
        div = jnp.float32(0.0)
        if pairs:
            div = diversity(x1[:pairs], x2[num_bd:num_bd + pairs], patterns[:pairs], patterns[num_bd:num_bd + pairs])
        loss = training.cross_entropy(logits, targets) + config.lambda_div * div
        return loss, (logits, classifier_stats, updates["batch_stats"], div)

    (loss, (logits, c_stats, g_stats, div)), (c_grads, g_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.classifier_params, state.generator["params"])
    c_updates, c_opt = classifier_opt.update(c_grads, state.classifier_opt, state.classifier_params)
    g_updates, g_opt = generator_opt.update(g_grads, state.generator_opt, state.generator["params"])
    generator = {"params": optax.apply_updates(state.generator["params"], g_updates), "batch_stats": g_stats}
    new_state = _JointState(optax.apply_updates(state.classifier_params, c_updates), c_stats, generator,
                            c_opt, g_opt)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    nan = jnp.float32(jnp.nan)
    metrics = {"loss": loss, "diversity": div,
               "clean_accuracy": jnp.mean(correct[num_bd + num_cross:]),
               "attack_accuracy": jnp.mean(correct[:num_bd]) if num_bd else nan,
               "cross_accuracy": jnp.mean(correct[num_bd:num_bd + num_cross]) if num_cross else nan}
    return new_state, metrics


@dataclasses.dataclass
class InputAwareResult:
    variables: dict  # the classifier's {"params", "batch_stats"}
    attack: InputAware
    history: list[dict]  # per epoch (mask pre-training epochs first, "stage": "mask" / "joint")
    seconds: float
    poison_count: int = 0  # set by ``train_for_run``


def _init(net, key, image_shape):
    return dict(jax.jit(net.init, static_argnames="train")(key, jnp.zeros((1, *image_shape), jnp.float32),
                                                            train=False))


def _epoch_mean(metrics: list[dict]) -> dict:
    metrics = jax.device_get(metrics)
    return {k: float(np.nanmean([m[k] for m in metrics])) for k in metrics[0]}


def _fingerprint(module, dataset: Dataset, target: TargetMap, key, config: InputAwareConfig,
                 train_config: training.TrainConfig, start) -> str:
    """What identifies one input-aware training: settings, data, target, key, architecture and
    starting weights (as ``training._fingerprint`` for ordinary training)."""
    return training.state_digest((type(module).__name__, repr(config), training._config_text(train_config),
                                  repr(target), dataset.info.name, np.asarray(jax.random.key_data(key)).tobytes(),
                                  np.ascontiguousarray(dataset.images).tobytes(),
                                  np.asarray(dataset.labels).tobytes()), start)


def train_input_aware(module, dataset: Dataset, target: TargetMap, key,
                      config: InputAwareConfig = InputAwareConfig(), train_config: training.TrainConfig | None = None,
                      *, variables=None, progress: bool = True, checkpoint_dir=None) -> InputAwareResult:
    """Train a classifier with an input-aware backdoor on the clean training set ``dataset``.

    module: the classifier (``bdjax.models.create``); ``variables``: its starting point
    (default: a fresh init from ``key``). ``train_config``: the classifier's training (epochs,
    batch size, optimizer, crop; default ``classifier_config(15)``). Each step reads two
    independently shuffled batches, as the authors' two data loaders.
    ``checkpoint_dir``: after every epoch (mask pre-training and joint) the whole state (both
    generators, the classifier, their optimizers, the data order) is saved there, and a call
    with the same arguments continues from it; the result equals an uninterrupted run's.
    Returns the classifier's variables and the fitted ``InputAware`` attack.
    """
    from tqdm.auto import tqdm

    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a bdjax.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(target, TargetMap):
        raise TypeError(f"target must be a TargetMap, got {type(target).__name__}")
    target.check_dataset(dataset)
    train_config = classifier_config(15) if train_config is None else train_config
    batch = train_config.batch_size
    if len(dataset) < batch:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than batch_size {batch}")
    height, width, channels = dataset.info.image_shape
    depth = 3
    if height % 2 ** depth or width % 2 ** depth:
        raise ValueError(f"the generators need H and W divisible by {2 ** depth}, got {height}x{width}")
    counts = (int(config.attack_rate * batch), int(config.cross_rate * batch))  # the authors' int()
    flip = dataset.info.flip_augment if train_config.flip is None else train_config.flip
    steps_per_epoch = train_config.steps_per_epoch(len(dataset))
    image_shape = (height, width, channels)
    init_key, pattern_key, mask_key, order_key, step_key = jax.random.split(key, 5)
    pattern_net, mask_net = Generator(channels, config.channels, depth), Generator(1, config.channels, depth)
    orders = [np.random.default_rng(np.asarray(jax.random.key_data(k)).ravel())
              for k in jax.random.split(order_key, 2)]
    images, labels = dataset.images, np.asarray(dataset.labels, np.int32)
    history, started = [], time.perf_counter()

    def batches(epoch):
        first, second = (rng.permutation(len(dataset)) for rng in orders)
        for i in range(steps_per_epoch):
            yield i, first[i * batch:(i + 1) * batch], second[i * batch:(i + 1) * batch]

    # Both stages' states exist from the start, so that one checkpoint layout serves every epoch.
    mask_opt = _adam(config.mask_lr, config.mask_milestones, steps_per_epoch)
    mask_variables = _init(mask_net, mask_key, image_shape)
    mask_state = _MaskState(mask_variables, mask_opt.init(mask_variables["params"]))
    mask_step = jax.jit(functools.partial(_mask_step, mask_net, mask_opt, config), donate_argnums=0)
    classifier_opt = training.make_optimizer(train_config, steps_per_epoch * train_config.epochs)
    generator_opt = _adam(config.generator_lr, config.generator_milestones, steps_per_epoch)
    if variables is None:
        variables = _init(module, init_key, image_shape)
    generator = _init(pattern_net, pattern_key, image_shape)
    state = _JointState(variables["params"], variables.get("batch_stats", {}), generator,
                        classifier_opt.init(variables["params"]), generator_opt.init(generator["params"]))
    step = jax.jit(functools.partial(_joint_step, module, pattern_net, mask_net, classifier_opt, generator_opt,
                                     target, config, counts, train_config.crop_padding, flip), donate_argnums=0)
    first_epoch, seconds_before, fingerprint = 0, 0.0, None
    if checkpoint_dir is not None:
        fingerprint = _fingerprint(module, dataset, target, key, config, train_config, (mask_state, state))
        saved = checkpoint.load_training_state(checkpoint_dir, (mask_state, state))
        if saved is not None:
            (mask_state, state), meta = saved
            if meta.get("fingerprint") != fingerprint:
                raise checkpoint.StaleTrainingState(
                    f"the training state in {checkpoint_dir} was written by another input-aware training (its "
                    "data, settings, seed or model differ); remove it or start again with --overwrite", checkpoint_dir)
            first_epoch, seconds_before, history = meta["epoch"], meta["seconds"], meta["history"]
            for rng, rng_state in zip(orders, meta["data_order"]):
                rng.bit_generator.state = rng_state
    total = config.mask_epochs + train_config.epochs

    for overall in range(first_epoch, total):
        metrics = []
        if overall < config.mask_epochs:  # 1. mask generator pre-training
            for _, first, second in tqdm(batches(overall), total=steps_per_epoch, disable=not progress, leave=False,
                                         desc=f"input-aware mask {overall + 1}/{config.mask_epochs}"):
                mask_state, m = mask_step(mask_state, jnp.asarray(images[first], jnp.float32) / 255.0,
                                          jnp.asarray(images[second], jnp.float32) / 255.0)
                metrics.append(m)
            history.append({"stage": "mask", **_epoch_mean(metrics)})
        else:  # 2. joint training of the classifier and the trigger generator (mask generator frozen)
            epoch = overall - config.mask_epochs
            epoch_key = jax.random.fold_in(step_key, epoch)
            for i, first, second in tqdm(batches(epoch), total=steps_per_epoch, disable=not progress, leave=False,
                                         desc=f"input-aware {epoch + 1}/{train_config.epochs}"):
                state, m = step(state, mask_state.variables, images[first], labels[first], images[second],
                                jax.random.fold_in(epoch_key, i))
                metrics.append(m)
            history.append({"stage": "joint", **_epoch_mean(metrics)})
            if progress:
                print(f"input-aware epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()
                                                                     if k != "stage"))
        if not np.isfinite(history[-1]["loss"]):
            raise FloatingPointError(f"input-aware training diverged in {history[-1]['stage']} epoch "
                                     f"{overall + 1} (loss {history[-1]['loss']}); lower the learning rates")
        if checkpoint_dir is not None:
            checkpoint.save_training_state(checkpoint_dir, jax.device_get((mask_state, state)), {
                "epoch": overall + 1, "epochs": total, "fingerprint": fingerprint,
                "seconds": seconds_before + time.perf_counter() - started, "history": history,
                "data_order": [rng.bit_generator.state for rng in orders]})
    mask_variables = mask_state.variables
    jax.block_until_ready(state)
    classifier = {"params": state.classifier_params}
    if state.classifier_stats:
        classifier["batch_stats"] = state.classifier_stats
    attack = InputAware(generator=state.generator, mask_generator=mask_variables, channels=config.channels)
    return InputAwareResult(classifier, attack, history, seconds_before + time.perf_counter() - started)


def train_for_run(spec, module, dataset: Dataset, target: TargetMap, key, train_config, progress: bool = True,
                  checkpoint_dir=None) -> InputAwareResult:
    """``bdjax train --attack input-aware`` (``runs.train_runs``): the classifier trained with the run's
    recipe (``train_config``), the generators with the paper's settings; ``spec.poison_rate`` is the
    attack rate and ``spec.attack_args`` the other ``InputAwareConfig`` fields. The result's
    ``poison_count`` is the attack-mode samples of one epoch. ``checkpoint_dir``: per-epoch training
    state, as ``bdjax train --resume`` reads it."""
    config = InputAwareConfig(attack_rate=spec.poison_rate, **spec.attack_args)
    result = train_input_aware(module, dataset, target, key, config, train_config, progress=progress,
                               checkpoint_dir=checkpoint_dir)
    result.poison_count = int(config.attack_rate * train_config.batch_size) * train_config.steps_per_epoch(len(dataset))
    return result
