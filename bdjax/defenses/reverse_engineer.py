"""Trigger reverse engineering per (images, target) task, and MAD anomaly scores.

Two objectives, both "the smallest trigger that sends these images to ``target``":

- ``"patch"`` (Neural Cleanse, Wang et al. 2019): x' = (1 − m)·x + m·p with mask m and
  pattern p tanh-parameterised into [0, 1]; loss CE(f(x'), t) + λ·‖m‖₁. Statistic 1/‖m‖₁.
- ``"perturbation"`` (Xiang et al. 2022): x' = clip(x + δ); loss CE(f(x'), t) + λ·‖δ‖₂.
  Statistic 1/‖δ‖₂.

λ follows Neural Cleanse's schedule: start at ``init_cost``; after ``patience`` consecutive
steps whose batch attack success is ≥ ``success_threshold`` multiply it by 2, after
``patience`` steps below divide it by 2^1.5. The reported trigger is the smallest one that
reached the threshold (the last one when none did; ``reached`` says which).

A *task* is (a bank of images, a target). Tasks are a ``vmap`` axis, so one optimisation
step of a chunk of tasks (e.g. ``chunk_size`` ordered class pairs (s, t) of BNA, or the C
target labels of Neural Cleanse) is one compiled program, called once per step from Python
(not a ``lax.scan``: see ``bdjax.loops`` on XLA:CPU convolutions in while loops).
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from bdjax import attacks, progress
from bdjax.data.dataset import Dataset, to_float, to_uint8

KINDS = ("patch", "perturbation")
SCHEDULES = ("step", "epoch")
INITS = ("small", "ones", "uniform")
MEDIANS = ("midpoint", "lower")


def _require_one_trigger(attack):
    if getattr(attack, "stochastic", False):
        raise ValueError(f"{type(attack).__name__} draws a new trigger per input: no single trigger is it")


@dataclasses.dataclass(frozen=True)
class ReverseConfig:
    """Trigger reverse engineering; defaults from Neural Cleanse's code (Wang et al. 2019).

    - ``learning_rate`` 0.1, Adam β = (0.5, 0.9), ``init_cost`` 1e-3, cost ×2 up / ÷2^1.5
      down after ``patience`` 5, ``success_threshold`` 0.98 (NC; also SPEC "Baselines").
      The perturbation objective has δ in pixel units, where a step of 0.1 is far too big:
      it uses ``perturbation_learning_rate`` 0.01 (our choice; Xiang et al. give no Adam lr).
    - ``schedule`` "step" (BNA's): ``steps`` optimisation steps on random batches of
      ``batch_size`` task images; the cost schedule counts steps and the best trigger is
      checked after every step. "epoch" (Neural Cleanse's code: the official ``visualizer.py``
      and BackdoorBench's ``defense/nc.py``): ``epochs`` shuffled passes over the task's images;
      the cost schedule and the best trigger use each epoch's mean batch success and mean mask
      norm; the trigger kept is the one at the end of that epoch (as both codes keep it). The
      last batch of an epoch is filled up from the epoch's first images (one compiled shape),
      where the references run a smaller last batch.
    - ``early_stop`` (epoch schedule only; NC's code): stop a task once the cost has gone both
      up and down and the best norm has not fallen below ``early_stop_threshold`` × its
      previous best for ``early_stop_patience`` epochs (official GTSRB script: 1.0 and 25;
      ``Visualizer``'s own defaults 0.99 and 20).
    - ``start_cost_at_zero``: the official ``Visualizer`` starts at cost 0 and sets
      ``init_cost`` after ``patience`` successful epochs (``RESET_COST_TO_ZERO``); BackdoorBench
      starts at ``init_cost`` (the default here).
    - ``init`` of mask and pattern: "small" (mask U(0.02, 0.2), pattern U(0.02, 0.98)),
      "ones" (BackdoorBench: both tanh-parameters 1, so mask = pattern = 0.88), "uniform" (the
      official script: mask and pattern U(0, 1)).
    - ``chunk_size`` tasks are vmapped per compiled call (memory vs. compile count).
    """

    kind: str = "patch"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 0.1
    perturbation_learning_rate: float = 0.01
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    patience: int = 5
    success_threshold: float = 0.98
    chunk_size: int = 64
    schedule: str = "step"
    epochs: int = 10
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    start_cost_at_zero: bool = False
    init: str = "small"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.steps < 1 or self.batch_size < 1 or self.chunk_size < 1 or self.epochs < 1:
            raise ValueError("steps, epochs, batch_size and chunk_size must be >= 1")

    @property
    def loop_length(self) -> int:
        """Step keys per task: one per step, or one per epoch (its shuffle)."""
        return self.steps if self.schedule == "step" else self.epochs


def as_reverse_config(value, base: ReverseConfig | None = None) -> ReverseConfig:
    """A ReverseConfig from itself or a dict of its fields (``--set reverse="{'steps': 50}"``);
    a dict overrides only its fields of ``base`` (default: ReverseConfig's defaults)."""
    if isinstance(value, ReverseConfig):
        return value
    if isinstance(value, dict):
        return dataclasses.replace(base or ReverseConfig(), **value)
    raise TypeError(f"reverse must be a ReverseConfig or a dict of its fields, got {type(value).__name__}")


class Trigger(struct.PyTreeNode):
    """x' = clip((1 − mask)·x + mask·pattern + delta) in [0, 1] pixel space.

    mask: f32[..., H, W, 1]; pattern, delta: f32[..., H, W, C]. A patch trigger has delta 0,
    a perturbation trigger mask 0. Leading axes, when present, index tasks.
    """

    mask: jax.Array
    pattern: jax.Array
    delta: jax.Array

    @classmethod
    def patch(cls, mask, pattern) -> Trigger:
        """A patch trigger (delta 0): mask f32[..., H, W, 1], pattern f32[..., H, W, C]."""
        pattern = jnp.asarray(pattern)
        return cls(jnp.asarray(mask), pattern, jnp.zeros_like(pattern))

    @classmethod
    def from_attack(cls, attack, image_shape) -> Trigger:
        """The attack's own trigger as a Trigger (an oracle for analysing a defense's later
        steps), for the attacks that are one: patch attacks (mask + pattern), Blended (mask α
        on every pixel, its pattern) and the additive ones, SIG / CB / SP (delta). Raises for
        attacks that are not (WaNet's warp, per-input random triggers)."""
        height, width, channels = image_shape
        _require_one_trigger(attack)
        if isinstance(attack, attacks.Blended):
            mask = jnp.full((height, width, 1), attack.alpha, jnp.float32)
            return cls.patch(mask, jnp.broadcast_to(attack.pattern, (height, width, channels)))
        if isinstance(attack, attacks.SIG):
            signal = attacks.sig.sinusoid(width, attack.delta, attack.frequency)
            delta = jnp.broadcast_to(signal[None, :, None], (height, width, channels))
            return cls(jnp.zeros((height, width, 1)), jnp.zeros((height, width, channels)), delta)
        if isinstance(attack, (attacks.Chessboard, attacks.SinglePixel)):
            delta = jnp.asarray(attack.perturbation, jnp.float32)
            return cls(jnp.zeros((height, width, 1)), jnp.zeros_like(delta), delta)
        if hasattr(attack, "mask") and hasattr(attack, "pattern"):
            return cls.patch(attack.mask, attack.pattern)
        raise ValueError(f"{type(attack).__name__} is not a mask/pattern or additive trigger")

    def stamp(self, images):
        """images: f32[N, H, W, C] -> f32[N, H, W, C] with the trigger applied.

        A stack of K triggers (leaves with a leading [K] axis, e.g. ``bna.reestimate`` with
        restarts) is applied in turn: image i gets trigger i mod K.
        """
        mask, pattern, delta = self.mask, self.pattern, self.delta
        if mask.ndim == images.ndim:
            which = jnp.arange(images.shape[0]) % mask.shape[0]
            mask, pattern, delta = mask[which], pattern[which], delta[which]
        mask = jnp.broadcast_to(mask, images.shape)
        pattern = jnp.broadcast_to(pattern, images.shape)
        delta = jnp.broadcast_to(delta, images.shape)
        return jnp.clip((1.0 - mask) * images + mask * pattern + delta, 0.0, 1.0)

    def stamp_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8[N, H, W, C] -> uint8 with the trigger applied (rounded like a saved image)."""
        return to_uint8(np.asarray(self.stamp(jnp.asarray(to_float(images)))))

    def take(self, index) -> Trigger:
        return jax.tree_util.tree_map(lambda x: x[index], self)


class AttackTrigger(struct.PyTreeNode):
    """A deterministic attack's own ``apply`` where a ``Trigger`` is expected (``stamp``): the
    oracle for attacks that are no mask/pattern/δ, e.g. WaNet's warp. A pytree (the attack is
    one), so it passes through ``jax.jit`` like a Trigger (``bna.align_batch_stats``)."""

    attack: attacks.Attack

    @classmethod
    def of(cls, attack) -> AttackTrigger:
        _require_one_trigger(attack)
        return cls(attack)

    def stamp(self, images):
        """images: f32[N, H, W, C] -> f32[N, H, W, C], the attack applied."""
        return self.attack.apply(images)


def oracle_trigger(attack, image_shape) -> Trigger | AttackTrigger:
    """The attack's own trigger: a ``Trigger`` where it is one (``Trigger.from_attack``),
    else the attack's ``apply`` (``AttackTrigger``; raises for per-input random triggers)."""
    try:
        return Trigger.from_attack(attack, image_shape)
    except ValueError:
        return AttackTrigger.of(attack)


class Reversed(struct.PyTreeNode):
    """Result of reverse engineering T tasks (NumPy or jax arrays)."""

    trigger: Trigger  # leaves with a leading [T] axis
    norm: jax.Array  # f32[T] ‖mask‖₁ (patch) or ‖δ‖₂ (perturbation)
    success: jax.Array  # f32[T] batch attack success of the reported trigger
    reached: jax.Array  # bool[T] the success threshold was reached at least once

    @property
    def statistic(self):
        """1 / norm: large for a suspiciously small trigger (BNA's detection statistic)."""
        return 1.0 / np.maximum(np.asarray(self.norm), 1e-12)


def _params_to_trigger(params, kind: str) -> Trigger:
    if kind == "patch":
        mask = (jnp.tanh(params["mask"]) + 1.0) / 2.0
        pattern = (jnp.tanh(params["pattern"]) + 1.0) / 2.0
        return Trigger.patch(mask, pattern)
    delta = params["delta"]
    return Trigger(jnp.zeros_like(delta[..., :1]), jnp.zeros_like(delta), delta)


def _trigger_norm(trigger: Trigger, kind: str):
    if kind == "patch":
        return jnp.sum(jnp.abs(trigger.mask))
    return jnp.sqrt(jnp.sum(jnp.square(trigger.delta)) + 1e-12)  # finite gradient at δ = 0


def _init_params(key, image_shape, kind: str, init: str = "small"):
    height, width, channels = image_shape
    if kind == "patch":
        if init == "ones":  # BackdoorBench: np.ones as the tanh-space parameters
            return {"mask": jnp.ones((height, width, 1)), "pattern": jnp.ones((height, width, channels))}
        mask_key, pattern_key = jax.random.split(key)
        low, high = (0.02, 0.2) if init == "small" else (0.0, 1.0)
        mask = jax.random.uniform(mask_key, (height, width, 1), minval=low, maxval=high)
        low, high = (0.02, 0.98) if init == "small" else (0.0, 1.0)
        pattern = jax.random.uniform(pattern_key, (height, width, channels), minval=low, maxval=high)
        # tanh⁻¹ of the draws; the official code keeps 0 and 1 finite the same way (its K.epsilon()).
        inverse = lambda v: jnp.arctanh(jnp.clip(2.0 * v - 1.0, -1.0 + 1e-6, 1.0 - 1e-6))
        return {"mask": inverse(mask), "pattern": inverse(pattern)}
    return {"delta": jnp.zeros((height, width, channels), jnp.float32)}


class _Search(typing.NamedTuple):
    """One task's optimisation state (leaves gain a leading [T] axis under vmap)."""

    params: dict
    opt_state: typing.Any
    cost: jax.Array
    up: jax.Array
    down: jax.Array
    best: Reversed
    # The epoch schedule's running sums and NC's flags (unused by the step schedule).
    epoch_success: jax.Array
    epoch_norm: jax.Array
    epoch_steps: jax.Array
    reg_best: jax.Array  # smallest epoch-mean norm of a successful epoch
    early_best: jax.Array
    early_count: jax.Array
    set_count: jax.Array
    went_up: jax.Array
    went_down: jax.Array
    stopped: jax.Array


def _optimizer(config: ReverseConfig):
    lr = config.learning_rate if config.kind == "patch" else config.perturbation_learning_rate
    return optax.adam(lr, b1=config.beta1, b2=config.beta2)


def search_start(image_shape, key, config: ReverseConfig) -> _Search:
    """The starting state of one task's search (traceable; vmap it over tasks)."""
    params = _init_params(key, image_shape, config.kind, config.init)
    start = _params_to_trigger(params, config.kind)
    best = Reversed(start, _trigger_norm(start, config.kind), jnp.float32(0.0), jnp.bool_(False))
    zero, inf, no = jnp.float32(0.0), jnp.float32(jnp.inf), jnp.bool_(False)
    cost = 0.0 if config.start_cost_at_zero else config.init_cost
    return _Search(params, _optimizer(config).init(params), jnp.float32(cost), jnp.int32(0), jnp.int32(0), best,
                   zero, zero, jnp.int32(0), inf, inf, jnp.int32(0), jnp.int32(0), no, no, no)


def _epoch_batch(key, n: int, batch: int, position):
    """int32[batch]: the ``position``-th batch of the epoch shuffle drawn from ``key``; the last
    batch is filled up from the start of the shuffle."""
    order = jax.random.permutation(key, n)
    steps = -(-n // batch)
    order = jnp.concatenate([order, order[:steps * batch - n]])
    return jax.lax.dynamic_slice(order, (position * batch,), (batch,))


def search_step(logits_fn, images, target, state: _Search, step_key, config: ReverseConfig, position=0) -> _Search:
    """One optimisation step of one task sending ``images`` (f32[n, H, W, C]) to ``target``.

    logits_fn: f32[B, H, W, C] -> f32[B, classes]. Traceable (vmap it over tasks). With the
    epoch schedule ``step_key`` is the epoch's key and ``position`` the step within the epoch;
    the cost and the best trigger then change only in ``search_epoch_end``.
    """
    kind = config.kind
    n = images.shape[0]
    batch = min(config.batch_size, n)
    if config.schedule == "epoch":
        batch_images = images[_epoch_batch(step_key, n, batch, position)]
    else:
        batch_images = images if batch == n else images[jax.random.randint(step_key, (batch,), 0, n)]
    labels = jnp.full((batch,), target, jnp.int32)

    def total(params):
        trigger = _params_to_trigger(params, kind)
        logits = logits_fn(trigger.stamp(batch_images))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        success = jnp.mean(jnp.argmax(logits, -1) == target)
        return ce + state.cost * _trigger_norm(trigger, kind), (trigger, success)

    (_, (trigger, success)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    norm = _trigger_norm(trigger, kind)
    if config.schedule == "epoch":
        updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.params)
        new = state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                             epoch_success=state.epoch_success + success, epoch_norm=state.epoch_norm + norm,
                             epoch_steps=state.epoch_steps + 1)
        return _unless_stopped(state, new)
    hit = success >= config.success_threshold
    best = state.best
    # Keep the smallest trigger that reached the threshold (else the latest one).
    better = (hit & (~best.reached | (norm < best.norm))) | (~best.reached & ~hit)
    best = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old),
                                  Reversed(trigger, norm, success, best.reached | hit), best)
    up = jnp.where(hit, state.up + 1, 0)
    down = jnp.where(hit, 0, state.down + 1)
    cost = jnp.where(up >= config.patience, state.cost * config.cost_up,
                     jnp.where(down >= config.patience, state.cost / config.cost_down, state.cost))
    up = jnp.where(up >= config.patience, 0, up)
    down = jnp.where(down >= config.patience, 0, down)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state, cost=cost,
                          up=up, down=down, best=best)


def _unless_stopped(old: _Search, new: _Search) -> _Search:
    return jax.tree_util.tree_map(lambda o, n: jnp.where(old.stopped, o, n), old, new)


def search_epoch_end(state: _Search, config: ReverseConfig) -> _Search:
    """The end of one epoch of one task (epoch schedule), in the order of NC's code: keep the
    current trigger if the epoch's mean success reached the threshold with a smaller mean norm
    than before (the current one while none has), check early stop, then move the cost."""
    steps = jnp.maximum(state.epoch_steps, 1)
    success, reg = state.epoch_success / steps, state.epoch_norm / steps
    hit = success >= config.success_threshold
    current = _params_to_trigger(state.params, config.kind)
    keep = (hit & (reg < state.reg_best)) | ~state.best.reached
    best = jax.tree_util.tree_map(
        lambda new, old: jnp.where(keep, new, old),
        Reversed(current, _trigger_norm(current, config.kind), success, state.best.reached | hit), state.best)
    reg_best = jnp.where(hit & (reg < state.reg_best), reg, state.reg_best)

    early_count, stop = state.early_count, jnp.bool_(False)
    if config.early_stop:
        finite = jnp.isfinite(reg_best)
        early_count = jnp.where(finite, jnp.where(reg_best >= config.early_stop_threshold * state.early_best,
                                                  early_count + 1, 0), early_count)
        stop = state.went_up & state.went_down & (early_count >= config.early_stop_patience)
    early_best = jnp.minimum(state.early_best, reg_best)

    # Cost 0 (``start_cost_at_zero``) becomes ``init_cost`` after ``patience`` successful epochs.
    set_count = jnp.where((state.cost == 0) & hit, state.set_count + 1, 0)
    reset = set_count >= config.patience
    cost = jnp.where(reset, config.init_cost, state.cost)
    up = jnp.where(reset, 0, state.up)
    down = jnp.where(reset, 0, state.down)
    went_up = state.went_up & ~reset
    went_down = state.went_down & ~reset
    up = jnp.where(hit, up + 1, 0)
    down = jnp.where(hit, 0, down + 1)
    raise_cost = up >= config.patience
    lower_cost = ~raise_cost & (down >= config.patience)
    cost = jnp.where(raise_cost, cost * config.cost_up, jnp.where(lower_cost, cost / config.cost_down, cost))
    moved = state._replace(cost=cost, up=jnp.where(raise_cost, 0, up), down=jnp.where(lower_cost, 0, down),
                           set_count=set_count, went_up=went_up | raise_cost, went_down=went_down | lower_cost)
    # An early-stopped epoch changes no cost (NC's code skips that part).
    after = jax.tree_util.tree_map(lambda s, m: jnp.where(stop, s, m), state, moved)
    zero = jnp.float32(0.0)
    new = after._replace(best=best, reg_best=reg_best, early_best=early_best, early_count=early_count,
                         epoch_success=zero, epoch_norm=zero, epoch_steps=jnp.int32(0), stopped=stop)
    return _unless_stopped(state, new)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_start(image_shape, config: ReverseConfig, keys):
    """Per task: its starting state and its [steps] step keys."""
    def one(key):
        init_key, loop_key = jax.random.split(key)
        return search_start(image_shape, init_key, config), jax.random.split(loop_key, config.loop_length)

    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _chunk_step(module, variables, bank, bank_index, targets, state, step_keys, config: ReverseConfig,
                position=0) -> _Search:
    """One step of every task in a chunk: task i uses ``bank[bank_index[i]]`` (f32[n, H, W, C])."""
    def logits_fn(images):
        return module.apply(variables, images, train=False)

    return jax.vmap(lambda i, t, s, k: search_step(logits_fn, bank[i], t, s, k, config, position))(
        bank_index, targets, state, step_keys)


@functools.partial(jax.jit, static_argnums=(1,))
def _chunk_epoch_end(state, config: ReverseConfig) -> _Search:
    return jax.vmap(lambda s: search_epoch_end(s, config))(state)


def _steps_per_epoch(bank, config: ReverseConfig) -> int:
    return -(-bank.shape[1] // min(config.batch_size, bank.shape[1]))


def _reverse_chunk(module, variables, bank, bank_index, targets, keys, config: ReverseConfig,
                   tracker: progress.Steps | None = None) -> Reversed:
    """All steps of a chunk of tasks: one compiled step, driven from Python (see the module notes).

    ``tracker``: reported after each step (which then waits for its result)."""
    def step_done(state):
        if tracker is not None:
            jax.block_until_ready(state)
            tracker.done()
        return state

    state, step_keys = _chunk_start(tuple(bank.shape[2:]), config, keys)
    if config.schedule == "step":
        for s in range(config.steps):
            state = step_done(_chunk_step(module, variables, bank, bank_index, targets, state, step_keys[:, s],
                                          config))
        return state.best
    per_epoch = _steps_per_epoch(bank, config)
    for epoch in range(config.epochs):
        for position in range(per_epoch):
            state = step_done(_chunk_step(module, variables, bank, bank_index, targets, state, step_keys[:, epoch],
                                          config, jnp.int32(position)))
        state = _chunk_epoch_end(state, config)
        if bool(np.all(np.asarray(state.stopped))):
            break
    return state.best


def reverse_engineer(module, variables, bank, bank_index, targets, key, config: ReverseConfig) -> Reversed:
    """Reverse-engineer one trigger per task, ``config.chunk_size`` tasks per compiled call.

    bank: f32[S, n, H, W, C] image sets; bank_index: int[T] which set each task uses;
    targets: int[T]. The last chunk is padded (one compilation). Returns NumPy ``Reversed``.
    """
    bank = jnp.asarray(bank)
    bank_index, targets = np.asarray(bank_index, np.int32), np.asarray(targets, np.int32)
    if bank.ndim != 5:
        raise ValueError(f"bank must be f32[S, n, H, W, C], got shape {bank.shape}")
    if bank_index.shape != targets.shape or bank_index.ndim != 1:
        raise ValueError(f"bank_index {bank_index.shape} and targets {targets.shape} must be matching 1-D arrays")
    count = targets.size
    if count == 0:
        raise ValueError("no tasks to reverse-engineer")
    size = min(config.chunk_size, count)
    keys = jax.random.split(key, count)
    parts = []
    per_chunk = config.steps if config.schedule == "step" else config.epochs * _steps_per_epoch(bank, config)
    chunks = -(-count // size)
    tracker = (progress.Steps(f"trigger search ({count} task(s) in {chunks} chunk(s)): steps", chunks * per_chunk)
               if progress.shown() else None)
    for start in range(0, count, size):
        stop = min(start + size, count)
        pad = size - (stop - start)
        index = np.concatenate([bank_index[start:stop], np.repeat(bank_index[start:start + 1], pad)])
        tgt = np.concatenate([targets[start:stop], np.repeat(targets[start:start + 1], pad)])
        chunk_keys = jnp.concatenate([keys[start:stop], jnp.repeat(keys[start:start + 1], pad, axis=0)])
        found = _reverse_chunk(module, variables, bank, jnp.asarray(index), jnp.asarray(tgt), chunk_keys, config,
                               tracker)
        kept = stop - start
        parts.append(jax.tree_util.tree_map(lambda x, kept=kept: np.asarray(x)[:kept], found))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)


# --------------------------------------------------------------------------- class banks
def class_bank(clean: Dataset, classes) -> np.ndarray:
    """f32[len(classes), n, H, W, C]: the same number n of clean images of each class.

    n is the smallest count among ``classes`` (10 with a 10-per-class defense set).
    """
    classes = np.asarray(classes, np.int64)
    members = [np.flatnonzero(clean.labels == c) for c in classes]
    n = min(len(m) for m in members)
    if n == 0:
        missing = [int(c) for c, m in zip(classes, members) if len(m) == 0]
        raise ValueError(f"the clean set has no image of class(es) {missing}")
    return np.stack([to_float(clean.images[m[:n]]) for m in members])


def ordered_pairs(num_classes: int, sources=None) -> np.ndarray:
    """int[P, 2] every (s, t) with s ∈ ``sources`` (default: all classes) and t ≠ s."""
    sources = range(num_classes) if sources is None else sources
    pairs = [(s, t) for s in sources for t in range(num_classes) if t != s]
    if not pairs:
        raise ValueError("no class pairs: need at least 2 classes")
    for s in sources:
        if not 0 <= s < num_classes:
            raise ValueError(f"source class {s} out of range [0, {num_classes})")
    return np.asarray(pairs, np.int32)


# --------------------------------------------------------------------------- MAD
def median_of(x, median: str = "midpoint") -> float:
    """The median of f[N]: "midpoint" (NumPy's, the mean of the two middle values when N is
    even) or "lower" (``torch.median``'s, the lower of the two, as BackdoorBench's NC uses)."""
    if median not in MEDIANS:
        raise ValueError(f"median must be one of {MEDIANS}, got {median!r}")
    x = np.asarray(x, np.float64)
    return float(np.median(x)) if median == "midpoint" else float(np.sort(x)[(x.size - 1) // 2])


def mad_scores(statistics, consistency: float = 1.0, median: str = "midpoint") -> np.ndarray:
    """Signed anomaly scores (x − median) / (consistency · MAD) of f[N] statistics.

    MAD = median |x − median| (Hampel 1974), both medians by the ``median`` convention
    (``median_of``; the two agree for odd N). Neural Cleanse uses consistency 1.4826 (the
    normal-consistency constant); the BNA paper divides by the MAD itself (appendix 8).
    """
    x = np.asarray(statistics, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"MAD needs a 1-D array of at least 2 statistics, got shape {x.shape}")
    center = median_of(x, median)
    mad = consistency * median_of(np.abs(x - center), median)
    return (x - center) / max(mad, 1e-12)
