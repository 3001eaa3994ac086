"""Training: a jitted step with BatchNorm updates and augmentation, and N models at once with vmap."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from bdjax import checkpoint, sharding, surgery
from bdjax.data.dataset import Dataset


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train a (possibly backdoored) model.

    Defaults are the thesis recipe (TAC paper, sec. 5.1: 15 epochs, Adam, lr 1e-3, batch 128).
    BackdoorBench's recipe is ``backdoorbench()``: SGD 0.01, momentum 0.9, wd 5e-4, cosine.
    """

    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "adam"  # "adam" | "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "cosine" | "step" (x0.1 at 50% and 75%)
    # Linear warm-up from 0 over this fraction of all steps (cosine schedule only).
    warmup_fraction: float = 0.0
    crop_padding: int = 4  # random crop after zero padding; 0 disables
    flip: bool | None = None  # None: the dataset's default (no flips for GTSRB)
    trainable: str = "all"  # "all" | "batch_norm" (only BN γ/β move; BN-unlearning)
    # "bfloat16": the forward and backward pass in bfloat16 on a bfloat16 copy of the parameters;
    # the parameters, optimizer state, BN statistics and the loss stay float32 (mixed precision).
    compute_dtype: str = "float32"  # "float32" | "bfloat16"

    @classmethod
    def backdoorbench(cls, epochs: int = 100) -> "TrainConfig":
        return cls(epochs=epochs, optimizer="sgd", learning_rate=0.01, momentum=0.9,
                   weight_decay=5e-4, schedule="cosine")

    def steps_per_epoch(self, train_size: int) -> int:
        """Optimizer steps per epoch on ``train_size`` images (the last partial batch is dropped)."""
        return train_size // self.batch_size

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule must be constant, cosine or step, got {self.schedule!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.trainable not in ("all", "batch_norm"):
            raise ValueError(f"trainable must be 'all' or 'batch_norm', got {self.trainable!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_fraction and self.schedule != "cosine":
            raise ValueError("warmup_fraction needs schedule='cosine'")


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    total_steps = max(total_steps, 1)
    lr = config.learning_rate
    if config.schedule == "cosine" and config.warmup_fraction:
        warmup = max(int(total_steps * config.warmup_fraction), 1)
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    elif config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, total_steps)
    elif config.schedule == "step":
        lr = optax.piecewise_constant_schedule(
            lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
    if config.optimizer == "sgd":
        # PyTorch-style coupled weight decay, as in the reference recipes.
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(lr, momentum=config.momentum, nesterov=config.nesterov))
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(lr))


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Multiplies every update: per-model learning rates in a vmapped sweep (1.0 otherwise;
    # the optimiser's own rate is then 1.0, and every schedule is linear in it).
    lr_scale: jax.Array

    @property
    def variables(self) -> dict:
        return _variables(self.params, self.batch_stats)


def _variables(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def augment(key, images, crop_padding: int, flip: bool):
    """Random crop (zero padding, like torchvision's RandomCrop) and horizontal flip, per image.

    images: f32[N, H, W, C] -> f32[N, H, W, C].
    """
    n, h, w, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
            padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flips, images[:, :, ::-1, :], images)
    return images


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_step(module, optimizer, crop_padding, flip, state: TrainState, images, labels, key,
                compute_dtype=jnp.float32):
    """One SGD step. images: uint8[B, H, W, C] (converted on device), labels: int32[B].

    ``compute_dtype`` bfloat16: the network runs on bfloat16 copies of the parameters and
    images (the gradient flows back through the cast into the float32 parameters); logits,
    loss and the BN statistics are float32."""
    images = augment(key, images.astype(jnp.float32) / 255.0, crop_padding, flip)
    low = compute_dtype != jnp.float32
    images = images.astype(compute_dtype)

    def loss_fn(params):
        if low:
            params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
        variables = _variables(params, state.batch_stats)
        if state.batch_stats:
            logits, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
            stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), updates["batch_stats"],
                                           state.batch_stats)
            return cross_entropy(logits.astype(jnp.float32), labels), (logits, stats)
        logits = module.apply(variables, images, train=True)
        return cross_entropy(logits.astype(jnp.float32), labels), (logits, state.batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, state.lr_scale)
    return new_state, {"loss": loss, "accuracy": accuracy}


@functools.lru_cache(maxsize=32)
def _compiled_step(module, config: TrainConfig, total_steps: int, flip: bool, image_shape: tuple):
    """(optimizer, vmapped jitted step), cached so repeated runs of one recipe compile once."""
    optimizer = make_optimizer(config, total_steps)
    if config.trainable == "batch_norm":
        # The mask needs only the variables' structure, which eval_shape gives without compute.
        init = functools.partial(module.init, train=False)
        shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32))
        optimizer = surgery.only_bn_params(optimizer, shapes)
    step = jax.jit(jax.vmap(functools.partial(_train_step, module, optimizer, config.crop_padding, flip,
                                              compute_dtype=COMPUTE_DTYPES[config.compute_dtype])),
                   donate_argnums=0)
    return optimizer, step


@dataclasses.dataclass
class TrainResult:
    variables: Any  # one model's variables, or stacked [M, ...] for train_many
    history: list[dict]  # per epoch: mean loss/accuracy (arrays of [M] for train_many)
    seconds: float


def _init_state(module, optimizer, key, image_shape):
    variables = module.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params), jnp.float32(1.0))


def train(module, dataset: Dataset, config: TrainConfig, key, *, variables=None,
          progress: bool = True, checkpoint_dir=None, on_epoch=None) -> TrainResult:
    """Train one model (from ``variables`` if given, else a fresh init from ``key``).

    ``checkpoint_dir`` and ``on_epoch``: as in ``train_many``.
    """
    result = train_many(module, dataset, config, jnp.asarray(key)[None],
                        variables=None if variables is None else _stack([variables]),
                        progress=progress, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch)
    return TrainResult(_unstack(result.variables, 0),
                       [{k: float(v[0]) for k, v in h.items()} for h in result.history],
                       result.seconds)


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def train_many(module, dataset: Dataset, config: TrainConfig, keys, *, variables=None,
               learning_rates=None, mesh=None, progress: bool = True, checkpoint_dir=None,
               on_epoch=None) -> TrainResult:
    """Train M models at once, one per key (own init, data order and augmentation), with vmap.

    keys: [M] PRNG keys. ``variables``: stacked [M, ...] starting points (default: fresh inits).
    ``learning_rates``: f32[M], one rate per model in place of ``config.learning_rate``.
    ``mesh``: a ``bdjax.sharding.sweep_mesh``; the M axis is split over its devices (M must
    be a multiple of the mesh size). Returns stacked variables (every leaf has a leading M
    axis) and per-epoch histories of shape [M]. All models see the same (poisoned) dataset.

    ``checkpoint_dir``: after every epoch the whole training state (parameters, BatchNorm
    statistics, optimiser state, data-order RNG, history) is written there atomically; a call
    that finds a state there continues after its last epoch and ends with exactly the weights
    of an uninterrupted run. A state written by another training (other data, recipe, keys or
    model) is refused. ``on_epoch(epoch, metrics)`` is called after each epoch (and its
    checkpoint); metrics hold the epoch's mean loss and accuracy.
    Raises ``TrainingDiverged`` (and checkpoints nothing of that epoch) when an epoch's loss is
    not finite.
    """
    if len(dataset) < config.batch_size:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than batch_size {config.batch_size}")
    num_models = jnp.shape(keys)[0]
    if mesh is not None and num_models % mesh.size:
        raise ValueError(f"{num_models} models do not split evenly over {mesh.size} devices; "
                         "pad with bdjax.sharding.pad_leading")
    lr_scale = jnp.ones((num_models,), jnp.float32)
    if learning_rates is not None:
        lr_scale = jnp.asarray(learning_rates, jnp.float32)
        if lr_scale.shape != (num_models,):
            raise ValueError(f"learning_rates must have shape ({num_models},), got {lr_scale.shape}")
        config = dataclasses.replace(config, learning_rate=1.0)
    steps_per_epoch = config.steps_per_epoch(len(dataset))
    optimizer, step = _compiled_step(module, config, steps_per_epoch * config.epochs,
                                     dataset.info.flip_augment if config.flip is None else config.flip,
                                     tuple(dataset.images.shape[1:]))
    init_keys, run_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    init_keys, run_keys = init_keys[:, 0], run_keys[:, 0]
    image_shape = dataset.images.shape[1:]
    if variables is None:
        state = jax.jit(jax.vmap(functools.partial(_init_state, module, optimizer, image_shape=image_shape)))(init_keys)
    else:
        state = jax.vmap(lambda v: TrainState(jnp.zeros((), jnp.int32), v["params"], v.get("batch_stats", {}),
                                              optimizer.init(v["params"]), jnp.float32(1.0)))(variables)
    state = state.replace(lr_scale=lr_scale)
    orders = [np.random.default_rng(np.asarray(jax.random.key_data(k)).ravel()) for k in run_keys]
    history, first_epoch, seconds_before = [], 0, 0.0
    if checkpoint_dir is not None:
        fingerprint = _fingerprint(module, dataset, config, keys, state, learning_rates)
        saved = checkpoint.load_training_state(checkpoint_dir, state)
        if saved is not None:
            state, meta = saved
            if meta.get("fingerprint") != fingerprint:
                raise checkpoint.StaleTrainingState(
                    f"the training state in {checkpoint_dir} was written by another training (its data, "
                    "recipe, seed or model differ); remove it or start again with --overwrite", checkpoint_dir)
            first_epoch, seconds_before = meta["epoch"], meta["seconds"]
            history = [{k: np.asarray(v) for k, v in h.items()} for h in meta["history"]]
            for rng, rng_state in zip(orders, meta["data_order"]):
                rng.bit_generator.state = rng_state
    state = sharding.shard_leading(state, mesh)
    run_keys = sharding.shard_leading(run_keys, mesh)
    images, labels = dataset.images, dataset.labels
    start = time.perf_counter()
    for epoch in range(first_epoch, config.epochs):
        perms = np.stack([rng.permutation(len(dataset)) for rng in orders])
        epoch_keys = jax.vmap(lambda k: jax.random.fold_in(k, epoch))(run_keys)
        epoch_metrics = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for i in bar:
            idx = perms[:, i * config.batch_size:(i + 1) * config.batch_size]
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(epoch_keys)
            batch = sharding.shard_leading((images[idx], labels[idx]), mesh)
            state, metrics = step(state, *batch, step_keys)
            if i % 20 == 0 or i == steps_per_epoch - 1:
                metrics = jax.device_get(metrics)
                bar.set_postfix(loss=f"{metrics['loss'].mean():.3f}", acc=f"{metrics['accuracy'].mean():.3f}")
            epoch_metrics.append(metrics)
        # One transfer per epoch keeps the steps dispatching asynchronously.
        epoch_metrics = jax.device_get(epoch_metrics)
        history.append({k: np.mean([m[k] for m in epoch_metrics], axis=0) for k in ("loss", "accuracy")})
        if not np.all(np.isfinite(history[-1]["loss"])):
            raise TrainingDiverged(f"training diverged in epoch {epoch + 1}: the loss is "
                                   f"{history[-1]['loss']} (lower the learning rate); this epoch was not saved")
        if checkpoint_dir is not None:
            checkpoint.save_training_state(checkpoint_dir, jax.device_get(state), {
                "epoch": epoch + 1, "epochs": config.epochs, "fingerprint": fingerprint,
                "seconds": seconds_before + time.perf_counter() - start, "history": history,
                "data_order": [rng.bit_generator.state for rng in orders]})
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    jax.block_until_ready(state)
    return TrainResult(state.variables, history, seconds_before + time.perf_counter() - start)


# TrainConfig fields added after checkpoints were written, with the value every older training had:
# at that value they stay out of the fingerprint, so that adding a field does not orphan them.
_LATER_FIELDS = {"compute_dtype": "float32"}


def _config_text(config: TrainConfig) -> str:
    """``repr(config)`` without the later fields at their old value (the repr older versions gave)."""
    fields = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
              if _LATER_FIELDS.get(f.name, object()) != getattr(config, f.name)]
    return f"{type(config).__qualname__}({', '.join(fields)})"


def _fingerprint(module, dataset: Dataset, config: TrainConfig, keys, start: TrainState, learning_rates) -> str:
    """What identifies one training: recipe, data, keys, architecture and starting weights.

    The architecture enters through its class name and the starting state's tree (initial or
    given weights), not ``repr(module)``, so that an attribute added to a model class in a
    later version of the library does not orphan the checkpoints of running trainings.
    """
    return state_digest((type(module).__name__, _config_text(config), dataset.info.name,
                         np.asarray(jax.random.key_data(keys)).tobytes(),
                         np.ascontiguousarray(dataset.images).tobytes(), np.asarray(dataset.labels).tobytes(),
                         b"" if learning_rates is None else np.asarray(learning_rates, np.float32).tobytes()),
                        (start.params, start.batch_stats))


def state_digest(parts, start) -> str:
    """SHA-256 hex of ``parts`` (str or bytes) and of every leaf of the tree ``start`` (its path,
    shape, dtype and bytes): a training checkpoint's fingerprint (also the input-aware attack's)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    for path, leaf in jax.tree_util.tree_leaves_with_path(start):
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, index: int):
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def unstack_models(stacked, count: int) -> list:
    """Split the stacked variables of ``train_many`` into ``count`` per-model trees."""
    return [_unstack(stacked, i) for i in range(count)]
