"""Channel Lipschitz constants of BN-paired convolutions, and per-layer outlier pruning.

Shared by CLP (Zheng et al., "Data-Free Backdoor Removal Based on Channel Lipschitzness",
ECCV 2022) and the suspiciousness score (Hashemifar et al., eq. 1), which borrows CLP's
spectral norm. Both flag, per layer, the channels whose score exceeds mean + u · std and
prune them by zeroing γ and β of their BatchNorm neuron.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import surgery
from bdjax.models.base import BN_EPSILON, ConvUnit


def channel_lipschitz(kernel: jax.Array, scale: jax.Array, var: jax.Array,
                      eps: float = BN_EPSILON) -> jax.Array:
    """Largest singular value of each output channel's kernel merged with its BatchNorm.

    kernel: f32[kh, kw, C_in, C_out] (Flax layout); scale (γ), var (running var): f32[C_out].
    Returns f32[C_out]: σ_max(W_k reshaped to (C_in, kh·kw)) · |γ_k| / sqrt(var_k + eps),
    CLP's definition (its code scales the kernel by |γ/σ| and takes the SVD of
    ``w[k].reshape(C_in, -1)``). The running mean and β only shift the output, so they do
    not enter a Lipschitz constant.
    """
    kh, kw, c_in, c_out = kernel.shape
    # [C_out, C_in, kh·kw]; singular values do not depend on how kh, kw are flattened.
    per_channel = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(c_out, c_in, kh * kw)
    largest = jnp.linalg.svd(per_channel, compute_uv=False)[:, 0]
    return largest * jnp.abs(scale) / jnp.sqrt(var + eps)


def bn_units_or_raise(module, variables, method: str) -> tuple[ConvUnit, ...]:
    """The conv units followed by a BatchNorm; a clear error when the model has none."""
    surgery.require_batch_norm(variables, method)
    units = surgery.bn_units(module)
    if not units:
        raise ValueError(f"{method} needs convolutions followed by BatchNorm; "
                         f"{type(module).__name__}.conv_units() lists none")
    return units


@functools.partial(jax.jit, static_argnums=2)
def lipschitz_of_units(params, batch_stats, units: tuple[ConvUnit, ...]) -> dict:
    """``{unit name: f32[C_out]}``, jit-compiled for the whole network at once (``units`` is
    static: hashable dataclasses). Callable inside another jitted function."""
    return {u.name: channel_lipschitz(surgery.get_path(params, u.conv)["kernel"],
                                      surgery.get_path(params, u.bn)["scale"],
                                      surgery.get_path(batch_stats, u.bn)["var"])
            for u in units}


def unit_lipschitz(module, variables) -> dict[str, jax.Array]:
    """``{unit name: f32[C_out]}`` for every BN-paired conv unit of the model.

    The conv -> BN pairing comes from ``module.conv_units()``, never from layer order.
    Shortcut (projection) convs are included: CLP scores every conv that a BN follows.
    """
    units = bn_units_or_raise(module, variables, "channel Lipschitzness")
    return lipschitz_of_units(variables["params"], variables["batch_stats"], units)


def outliers_above(scores: jax.Array, u) -> jax.Array:
    """bool[C]: channels with score > mean + u · std of the layer's scores f32[C].

    The std is the unbiased one (ddof = 1), as ``torch.Tensor.std`` in CLP's code. Pure jnp,
    so it vmaps over a sweep of ``u``. Non-finite scores never count as outliers.
    """
    threshold = jnp.mean(scores) + u * jnp.std(scores, ddof=1)
    return jnp.isfinite(scores) & (scores > threshold)


def prune_bn_channels(module, variables, masks: Mapping[str, jax.Array]) -> tuple[dict, dict[str, list[int]]]:
    """Zero γ and β of the flagged channels. masks: ``{unit name: bool[C]}``.

    Returns ``(new variables, {unit name: sorted pruned channel indices})``.
    """
    by_name = {u.name: u for u in surgery.bn_units(module)}
    pruned: dict[str, list[int]] = {}
    for name, mask in masks.items():
        channels = np.flatnonzero(np.asarray(mask))
        pruned[name] = [int(c) for c in channels]
        if channels.size:
            variables = surgery.zero_bn_neurons(variables, by_name[name], channels)
    return variables, pruned


def mask_bn_channels(module, variables, masks: Mapping[str, jax.Array]) -> dict:
    """``prune_bn_channels`` without the index lists: pure jnp, so it vmaps over a sweep of masks."""
    by_name = {u.name: u for u in surgery.bn_units(module)}
    for name, mask in masks.items():
        variables = surgery.mask_bn_neurons(variables, by_name[name], mask)
    return variables
