"""NAD: neural attention distillation.

Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from
Deep Neural Networks", ICLR 2021 (official code: bboylyg/NAD). A teacher is the backdoored
model fine-tuned on the clean set (``finetune``, FT); the student -- the backdoored model
again -- is fine-tuned with

    L = CE(student(x), y) + Σ_l β_l · ‖A(a_l^student(x)) − A(a_l^teacher(x))‖² / (h·w),

where A(a) = mean over channels of |a|^p, flattened and L2-normalised (the attention map),
on the outputs of a few conv units (``attention_units``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import loops, surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.finetune import FinetuneConfig, finetune
from bdjax.models.base import ConvUnit
from bdjax.training import TrainConfig, augment, cross_entropy, make_optimizer


@dataclasses.dataclass(frozen=True)
class NadConfig:
    """β 500 / 1000 / 1000 and p = 2: the official code's CIFAR-10 setting (``--beta1 500
    --beta2 1000 --beta3 1000 --p 2``); 10 epochs for teacher and student (SPEC "Baselines",
    NAD's ``--te_epochs 10``). The optimiser is the one of our FT baseline (SGD lr 0.01,
    momentum 0.9, wd 5e-4, cosine; BackdoorBench's NAD uses lr 0.01), so the teacher is
    exactly ``bdjax defend ft`` with ``epochs = teacher_epochs``. With a tiny clean set an
    epoch is a single step.

    units: names of the conv units whose outputs are distilled (``ConvUnit.name``), one per
        β; None picks ``attention_units``.
    """

    epochs: int = 10
    teacher_epochs: int = 10
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    power: float = 2.0
    units: tuple[str, ...] | None = None
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4

    def __post_init__(self):
        if self.epochs < 0 or self.teacher_epochs < 0 or self.batch_size < 1:
            raise ValueError("need epochs >= 0, teacher_epochs >= 0 and batch_size >= 1")
        if self.units is not None and len(self.units) != len(self.betas):
            raise ValueError(f"one β per unit: got {len(self.units)} units and {len(self.betas)} betas")

    def optimizer_config(self, epochs: int) -> FinetuneConfig:
        return FinetuneConfig(epochs=epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                              momentum=self.momentum, weight_decay=self.weight_decay,
                              crop_padding=self.crop_padding)


# --------------------------------------------------------------------------- attention
def attention_map(features: jax.Array, power: float = 2.0, eps: float = 1e-6) -> jax.Array:
    """features f32[N, h, w, C] -> f32[N, h·w]: mean_c |a|^p, flattened, divided by its L2 norm
    (+ eps, as NAD's ``AT.attention_map``)."""
    am = jnp.mean(jnp.abs(features) ** power, axis=-1).reshape(features.shape[0], -1)
    return am / (jnp.linalg.norm(am, axis=-1, keepdims=True) + eps)


def attention_loss(student: jax.Array, teacher: jax.Array, power: float = 2.0) -> jax.Array:
    """NAD's AT loss: mean squared difference of the two attention maps (``F.mse_loss``)."""
    return jnp.mean(jnp.square(attention_map(student, power) - attention_map(teacher, power)))


_BLOCK = re.compile(r"^(\D*\d+)_\d+$")  # "stage2_1" -> stage "stage2"


def attention_units(module, count: int = 3) -> tuple[ConvUnit, ...]:
    """NAD's distillation points: the last unit of each of the last ``count`` residual stages
    (blocks named ``<stage>_<index>``, as in ResNet-20/18), else the last ``count`` conv units.
    Shortcut convs are skipped."""
    units = [u for u in module.conv_units() if not u.shortcut]
    stages: dict[str, ConvUnit] = {}
    for u in units:
        match = _BLOCK.match(u.conv[0]) if len(u.conv) > 1 else None
        if match:
            stages[match.group(1)] = u  # insertion order = network order; keeps the last unit
    chosen = list(stages.values()) if len(stages) >= count else units
    if len(chosen) < count:
        raise ValueError(f"NAD needs {count} conv units to distil, {type(module).__name__} has {len(chosen)}")
    return tuple(chosen[-count:])


def _resolve_units(module, names: tuple[str, ...] | None, count: int) -> tuple[ConvUnit, ...]:
    if names is None:
        return attention_units(module, count)
    by_name = {u.name: u for u in module.conv_units()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown conv units {unknown}; known: {', '.join(by_name)}")
    return tuple(by_name[n] for n in names)


# --------------------------------------------------------------------------- distillation
def distill(variables, teacher_variables, images, labels, batches, keys, *, module,
            units: tuple[ConvUnit, ...], betas: tuple[float, ...], power: float,
            train_config: TrainConfig, crop_padding: int, flip: bool):
    """Every student step (``distill_step``) in ``bdjax.loops.scan``, compiled once per model,
    configuration and shape; the optimiser is ``make_optimizer(train_config, T)``.

    images uint8[N, H, W, C], labels int32[N], batches int32[T, B] (indices per step),
    keys [T] (augmentation). Returns the student's variables and per-step CE / attention
    losses f32[T].
    """
    step = functools.partial(distill_step, module=module, paths=tuple(u.output for u in units), betas=betas,
                             power=power, train_config=train_config, total_steps=len(batches),
                             crop_padding=crop_padding, flip=flip)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = make_optimizer(train_config, len(batches)).init(params)
    (params, batch_stats, _), history = loops.scan(step, (params, batch_stats, opt_state), (batches, keys),
                                                     consts=(teacher_variables, images, labels))
    return {**variables, "params": params, **({"batch_stats": batch_stats} if batch_stats else {})}, history


def distill_step(data, carry, batch, *, module, paths: tuple, betas: tuple[float, ...], power: float,
                 train_config: TrainConfig, total_steps: int, crop_padding: int, flip: bool):
    """One student step: ``data = (teacher variables, images uint8[N, ...], labels int32[N])``,
    ``carry = (params, batch_stats, optimizer state)``, ``batch = (indices int32[B], key)``."""
    teacher_variables, images, labels = data
    params, batch_stats, opt_state = carry
    index, key = batch
    x = augment(key, images[index].astype(jnp.float32) / 255.0, crop_padding, flip)
    y = labels[index]
    teacher = surgery.layer_outputs(module, teacher_variables, x, paths)

    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        (logits, student), updates = surgery.apply_with_edits(module, variables, x, capture=paths,
                                                              train=True, mutable=["batch_stats"])
        ce = cross_entropy(logits, y)
        at = sum(beta * attention_loss(student[p], jax.lax.stop_gradient(teacher[p]), power)
                 for beta, p in zip(betas, paths))
        return ce + at, (ce, at, updates.get("batch_stats", batch_stats))

    (_, (ce, at, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_optimizer(train_config, total_steps).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), {"ce": ce, "attention": at}


def _batch_indices(count: int, batch: int, epochs: int, seed) -> np.ndarray:
    """int32[epochs · (count // batch), batch]: a fresh permutation per epoch, last partial batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = count // batch
    if epochs == 0:
        return np.zeros((0, batch), np.int32)
    return np.concatenate([rng.permutation(count)[:per_epoch * batch].reshape(per_epoch, batch)
                           for _ in range(epochs)]).astype(np.int32)


@register("nad", NadConfig, kind="fine-tuning",
          paper="Li et al., ICLR 2021",
          summary="NAD: fine-tune with attention distillation from a fine-tuned teacher")
def nad(module, variables, clean: Dataset, key, config: NadConfig = NadConfig()) -> DefenseResult:
    """Fine-tune a teacher on ``clean``, then distil its attention maps into the backdoored model."""
    check_clean_set(clean, "NAD")
    units = _resolve_units(module, config.units, len(config.betas))
    teacher_key, student_key = jax.random.split(key)
    teacher = finetune(module, variables, clean, teacher_key, config.optimizer_config(config.teacher_epochs))

    batch = min(config.batch_size, len(clean))
    batches = _batch_indices(len(clean), batch, config.epochs, np.asarray(jax.random.key_data(student_key)).ravel())
    train_config = TrainConfig(epochs=config.epochs, batch_size=batch, optimizer="sgd",
                               learning_rate=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay, schedule="cosine")
    keys = jax.random.split(jax.random.fold_in(student_key, 1), len(batches))
    student, history = distill(variables, teacher.variables, jnp.asarray(clean.images), jnp.asarray(clean.labels),
                               jnp.asarray(batches), keys, module=module, units=units,
                               betas=tuple(float(b) for b in config.betas), power=float(config.power),
                               train_config=train_config, crop_padding=config.crop_padding,
                               flip=clean.info.flip_augment)
    return DefenseResult(student, info={
        "units": [u.name for u in units], "history": jax.device_get(history),
        "teacher_loss": teacher.info["train_loss"],
    })
