"""ABS-style candidates and triggers (Liu et al., CCS 2019), simplified, as the TAC thesis's
comparator (its sec. 3.1.1, 4.1.3, 4.2.4; table 5.3), pruned the thesis's way.

What is kept from ABS, and how it is simplified:

- Neuron stimulation: channel k of a conv unit (its post-BN output, as TAC) is *replaced* by
  a constant map of value v, for ``samples`` values v evenly spaced in
  [0, ``stimulation`` × the unit's largest clean output], and the rest of the network runs
  on every clean image (ABS samples per-neuron values up to its observed maximum and also
  stimulates dense neurons; we stimulate conv channels only, with one grid per unit).
- Elevation difference: per image, the peak over v of the most elevated label's logit minus
  the peak of any other label; the channel's label L is the most frequent peak label and its
  score the minimum over images of (peak of L − peak of the rest), so one image that L does
  not win makes the score negative (ABS's "consistently elevates one label" rule). The top
  ``candidates`` channels over all units (20, thesis table 5.3) are the candidates.
- Reverse engineering: a mask m = ½(tanh a + 1) [H, W, 1] and pattern p = ½(tanh b + 1)
  [H, W, C], x_t = (1 − m)·x + m·p, minimising −mean f_k(x_t) + mean_{i≠k} |f_i(x_t) − f_i(x)|
  + ``size_weight`` · relu(mean m − ``max_size``) with Adam (ABS's loss without its
  later-epoch re-weighting and without the SSIM / filter variants). Valid when the trigger's
  ASR into L on the clean set exceeds 0.85 (table 5.3).
- Mitigation: not Dhonthi et al.'s retraining (which the thesis pairs with ABS) but the
  thesis's own TAC pruning of each valid trigger (``tac.mark_tac_outliers``), so the two
  defenses differ only in how candidates and triggers are found.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, register
from bdjax.defenses.tac import (
    TacConfig,
    check_model_and_clean_set,
    mark_tac_outliers,
    no_channels,
    prune_conv_channels,
)
from bdjax.defenses.trigger_reconstruction import layer_output, success_rate


@dataclasses.dataclass(frozen=True)
class AbsConfig:
    """candidates 20 and asr_valid 0.85: thesis table 5.3. u_prune: the TAC threshold of
    table 5.2. samples, stimulation, epochs, lr, max_size (ABS's default mask bound, 6 % of
    the image) and size_weight are our choices for the simplified ABS (module docstring)."""

    candidates: int = 20
    samples: int = 8
    stimulation: float = 3.0
    epochs: int = 300
    lr: float = 0.1
    max_size: float = 0.06
    size_weight: float = 50.0
    asr_valid: float = 0.85
    u_prune: float = TacConfig.u_prune

    def __post_init__(self):
        if self.candidates < 0 or self.samples < 2 or self.epochs < 1:
            raise ValueError("need candidates >= 0, samples >= 2 and epochs >= 1")


# --------------------------------------------------------------------------- stimulation
@functools.partial(jax.jit, static_argnames=("module", "path", "samples", "stimulation"))
def _elevation(variables, images, *, module, path, samples: int, stimulation: float):
    features = surgery.layer_outputs(module, variables, images, [path])[path]  # [N, h, w, C]
    values = jnp.linspace(0.0, stimulation * jnp.max(features), samples)

    def channel_score(channel):
        one_hot = jax.nn.one_hot(channel, features.shape[-1], dtype=features.dtype)[None, None, None, :]

        def logits_at(value):  # the channel's whole map set to ``value``
            return surgery.replace_layer(module, variables, images, path,
                                         features * (1.0 - one_hot) + value * one_hot)

        peaks = jnp.max(jax.vmap(logits_at)(values), axis=0)  # [N, classes]: peak over v
        label = jnp.argmax(jnp.bincount(jnp.argmax(peaks, axis=-1), length=peaks.shape[-1]))
        others = jnp.max(jnp.where(jnp.arange(peaks.shape[-1])[None, :] == label, -jnp.inf, peaks), axis=-1)
        return jnp.min(peaks[:, label] - others), label.astype(jnp.int32)

    return jax.lax.map(channel_score, jnp.arange(features.shape[-1]))


def elevation_differences(module, variables, images, config: AbsConfig = AbsConfig(), units=None) -> dict:
    """``{unit name: (f32[C] elevation difference, int32[C] elevated label)}`` for ``units``
    (default: every conv unit). images: f32[N, H, W, C]."""
    images = jnp.asarray(images)
    return {u.name: jax.device_get(_elevation(variables, images, module=module, path=u.output,
                                              samples=config.samples, stimulation=config.stimulation))
            for u in (module.conv_units() if units is None else units)}


# --------------------------------------------------------------------------- reverse engineering
def _stamp(images, params):
    mask = 0.5 * (jnp.tanh(params[0]) + 1.0)
    pattern = 0.5 * (jnp.tanh(params[1]) + 1.0)
    return (1.0 - mask[None]) * images + mask[None] * pattern[None], mask


def _reverse_loss(module, variables, images, clean, path, config: AbsConfig, channel, params):
    triggered, mask = _stamp(images, params)
    logits, captured = surgery.apply_with_edits(module, variables, triggered, capture=[path])
    inside = jax.nn.one_hot(channel, clean.shape[-1], dtype=clean.dtype)
    change = jnp.abs(captured[path] - clean)
    others = jnp.sum(jnp.mean(change, axis=(0, 1, 2)) * (1.0 - inside)) / (clean.shape[-1] - 1)
    activation = jnp.mean(jnp.take(captured[path], channel, axis=-1))
    size = jnp.mean(mask)
    return -activation + others + config.size_weight * jax.nn.relu(size - config.max_size), logits


@functools.partial(jax.jit, static_argnames=("module", "path", "config"))
def _reverse_step(variables, images, clean, channels, state, *, module, path, config: AbsConfig):
    """One Adam step for every candidate (vmapped over channels)."""
    optimizer = optax.adam(config.lr)

    def one_channel(channel, params, opt_state):
        grad, _ = jax.grad(lambda p: _reverse_loss(module, variables, images, clean, path, config, channel, p),
                           has_aux=True)(params)
        updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(params, updates), opt_state

    return jax.vmap(one_channel)(channels, *state)


@functools.partial(jax.jit, static_argnames=("module", "path", "config"))
def _reverse_finish(variables, images, labels, clean, channels, targets, params, *, module, path, config: AbsConfig):
    def one_channel(channel, target, params):
        _, logits = _reverse_loss(module, variables, images, clean, path, config, channel, params)
        return success_rate(logits, labels, target), jnp.mean(_stamp(images, params)[1])

    return jax.vmap(one_channel)(channels, targets, params)


def _reverse(variables, images, labels, channels, targets, *, module, path, config: AbsConfig):
    """Mask / pattern triggers for ``channels`` (int[K]) of the unit at ``path``: ``(params, asr,
    size)``. A host loop of one compiled step for all K: XLA:CPU runs a convolution's backward
    pass several times slower inside a ``lax.scan`` (``bdjax.loops``); 20 epochs of two
    channels of a CIFAR-10 ResNet-20 unit took 34 s against 129 s in the scan (compilation
    included, on a core shared with another job)."""
    channels, targets = jnp.asarray(channels, jnp.int32), jnp.asarray(targets, jnp.int32)
    clean = layer_output(variables, images, module=module, path=path)
    start = (jnp.full(images.shape[1:3] + (1,), -2.0), jnp.zeros(images.shape[1:]))
    params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (channels.shape[0], *a.shape)), start)
    state = (params, jax.vmap(optax.adam(config.lr).init)(params))
    for _ in range(config.epochs):
        state = _reverse_step(variables, images, clean, channels, state, module=module, path=path, config=config)
    asr, size = _reverse_finish(variables, images, labels, clean, channels, targets, state[0],
                                module=module, path=path, config=config)
    return state[0], asr, size


@register("abs", AbsConfig, kind="pruning",
          paper="Liu et al., CCS 2019 (simplified), pruned as in Koldenhof 2023",
          summary="ABS-style (simplified) stimulation candidates and mask triggers, "
          "then TAC pruning of the valid triggers")
def abs_defense(module, variables, clean: Dataset, key, config: AbsConfig = AbsConfig()) -> DefenseResult:
    """Stimulation candidates -> mask/pattern triggers -> TAC pruning. Deterministic (``key`` unused)."""
    del key
    check_model_and_clean_set(module, variables, clean, "ABS")
    images, labels = jnp.asarray(clean.floats()), jnp.asarray(clean.labels)
    scores = elevation_differences(module, variables, images, config)
    ranked = sorted(((float(s), u.name, int(c), int(scores[u.name][1][c])) for u in module.conv_units()
                     for c, s in enumerate(scores[u.name][0])), reverse=True)[:config.candidates]
    final, triggers = no_channels(module, variables), []
    for unit in module.conv_units():
        chosen = [(c, label) for _, name, c, label in ranked if name == unit.name]
        if not chosen:
            continue
        channels, targets = (np.array(x, np.int32) for x in zip(*chosen))
        params, asr, size = jax.device_get(_reverse(variables, images, labels, channels, targets,
                                                    module=module, path=unit.output, config=config))
        for i, (channel, target) in enumerate(chosen):
            mask = 0.5 * (np.tanh(params[0][i]) + 1.0)
            pattern = 0.5 * (np.tanh(params[1][i]) + 1.0)
            valid = bool(asr[i] > config.asr_valid)
            triggers.append({"unit": unit.name, "channel": channel, "target": target, "asr": float(asr[i]),
                             "size": float(size[i]), "valid": valid, "mask": mask, "pattern": pattern})
            if valid:
                final[unit.name][channel] = True
                triggered = (1.0 - mask[None]) * images + mask[None] * pattern[None]
                mark_tac_outliers(final, module, variables, images, triggered, config.u_prune)
    new_variables, pruned = prune_conv_channels(module, variables, final)
    return DefenseResult(new_variables, info={
        "candidates": [(name, c, s, label) for s, name, c, label in ranked], "triggers": triggers,
        "detected": any(t["valid"] for t in triggers), "pruned": pruned,
        "pruned_count": sum(map(len, pruned.values())),
    })
