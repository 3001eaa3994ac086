"""Model surgery shared by every defense: read, perturb and edit named layers and neurons.

Layers are addressed by their module path in the variables tree, e.g. ``("stage1_0", "bn1")``;
``ConvUnit.output`` gives the path whose output is a conv's (post-BN) channel output.
Reading and editing intermediate outputs uses ``flax.linen.intercept_methods``, so it works
for every architecture without changing its code, and everything here is jit-compatible.
Parameter edits are pure: they return new variables and leave the inputs untouched.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bdjax.models.base import BN_MOMENTUM, ConvUnit, Path

Edit = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- tree paths
def get_path(tree: Mapping, path: Path):
    node = tree
    for key in path:
        if key not in node:
            raise KeyError(f"no entry {'/'.join(path)!r} (missing {key!r}); "
                           f"available here: {sorted(node)}")
        node = node[key]
    return node


def set_path(tree: Mapping, path: Path, value) -> dict:
    """A copy of nested dict ``tree`` with ``tree[path] = value`` (copies only along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if rest and head not in tree:
        raise KeyError(f"no entry {head!r} on the way to {'/'.join(path)!r}")
    new = dict(tree)
    new[head] = set_path(tree[head], rest, value) if rest else value
    return new


def has_batch_norm(variables) -> bool:
    return bool(variables.get("batch_stats"))


def require_batch_norm(variables, method: str):
    """Raise a clear error when a BatchNorm-based method is given a model without BatchNorm."""
    if not has_batch_norm(variables):
        raise ValueError(f"{method} works on BatchNorm statistics, but this model has no BatchNorm "
                         "layers (variables has no 'batch_stats'); use an architecture with BN "
                         "(e.g. resnet20, small-bn)")


def bn_units(module) -> tuple[ConvUnit, ...]:
    return tuple(u for u in module.conv_units() if u.bn is not None)


# --------------------------------------------------------------------------- activations
def apply_with_edits(module, variables, images, edits: Mapping[Path, Edit] | None = None,
                     capture: Iterable[Path] = (), train: bool = False, mutable=False):
    """Forward pass where the output of each module at path p is replaced by ``edits[p](out)``.

    Returns ``(logits, captured)`` with ``captured[p]`` the (edited) output of each path in
    ``capture``; with ``mutable`` (e.g. ``["batch_stats"]``) returns
    ``((logits, captured), updated_collections)`` like ``module.apply``.
    """
    edits = dict(edits or {})
    capture = tuple(capture)
    captured: dict[Path, jax.Array] = {}
    wanted = set(edits) | set(capture)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name != "__call__" or path not in wanted:
            return out
        if path in edits:
            out = edits[path](out)
        if path in capture:
            captured[path] = out
        return out

    with nn.intercept_methods(interceptor):
        result = module.apply(variables, images, train=train, mutable=mutable)
    missing = set(capture) - set(captured)
    if missing:
        raise KeyError(f"layers {sorted('/'.join(p) for p in missing)} were never called; "
                       "check the path against module.conv_units()")
    if mutable:
        logits, updates = result
        return (logits, captured), updates
    return result, captured


def layer_outputs(module, variables, images, paths: Iterable[Path]) -> dict[Path, jax.Array]:
    """Eval-mode outputs of the given module paths. images: f32[N, H, W, C] -> {path: [N, h, w, c]}."""
    _, captured = apply_with_edits(module, variables, images, capture=paths)
    return captured


def layer_inputs(module, variables, images, paths: Iterable[Path]) -> dict[Path, jax.Array]:
    """Eval-mode inputs (first argument) of the given module paths, e.g. the pooled features
    f32[N, F] that reach ``("classifier",)``."""
    wanted, captured = set(paths), {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path in wanted:
            captured[context.module.path] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, images, train=False)
    missing = wanted - set(captured)
    if missing:
        raise KeyError(f"layers {sorted('/'.join(p) for p in missing)} were never called")
    return captured


def unit_outputs(module, variables, images, units: Iterable[ConvUnit] | None = None):
    """Post-BN (pre-activation) channel outputs of conv units, keyed by unit name."""
    units = tuple(module.conv_units() if units is None else units)
    captured = layer_outputs(module, variables, images, [u.output for u in units])
    return {u.name: captured[u.output] for u in units}


def perturb_layer(module, variables, images, path: Path, delta):
    """Logits with ``delta`` added to the output of ``path`` (broadcast over the batch).

    delta: f32[h, w, c] or f32[N, h, w, c]; zero outside the channels being perturbed.
    """
    # Explicit broadcast: the batch axis is added on purpose, not by rank promotion.
    logits, _ = apply_with_edits(module, variables, images,
                                 edits={path: lambda out: out + jnp.broadcast_to(delta, out.shape)})
    return logits


def replace_layer(module, variables, images, path: Path, value):
    """Logits of the network whose layer ``path`` outputs ``value`` (runs "the rest" of it)."""
    logits, _ = apply_with_edits(module, variables, images,
                                 edits={path: lambda out: jnp.broadcast_to(value, out.shape)})
    return logits


def channel_delta(shape, channels, values) -> jax.Array:
    """A [h, w, c] perturbation that is ``values`` ([h, w] or [h, w, k]) on ``channels`` and 0 elsewhere."""
    channels = jnp.atleast_1d(jnp.asarray(channels))
    values = jnp.asarray(values)
    if values.ndim == 2:
        values = jnp.repeat(values[..., None], channels.size, axis=-1)
    return jnp.zeros(shape, values.dtype).at[..., channels].set(values)


def scale_channels(module, variables, images, masks: Mapping[Path, jax.Array], train=False):
    """Logits with each listed layer's output multiplied per channel by ``masks[path]`` (f32[c])."""
    logits, _ = apply_with_edits(module, variables, images, train=train,
                                 edits={p: (lambda out, m=m: out * jnp.broadcast_to(m, out.shape))
                                        for p, m in masks.items()})
    return logits


# --------------------------------------------------------------------------- parameter edits
def _channel_mask(size: int, channels) -> jax.Array:
    return jnp.zeros((size,), bool).at[jnp.asarray(channels, jnp.int32)].set(True)


def zero_conv_channels(variables, unit: ConvUnit | Path, channels, keep_bias: bool = True) -> dict:
    """Zero the kernels of output ``channels`` of a conv (and its bias unless ``keep_bias``)."""
    path = unit.conv if isinstance(unit, ConvUnit) else unit
    conv = dict(get_path(variables["params"], path))
    mask = _channel_mask(conv["kernel"].shape[-1], channels)
    conv["kernel"] = jnp.where(mask, 0.0, conv["kernel"])
    if not keep_bias and "bias" in conv:
        conv["bias"] = jnp.where(mask, 0.0, conv["bias"])
    return {**variables, "params": set_path(variables["params"], path, conv)}


def zero_bn_neurons(variables, bn: ConvUnit | Path, channels) -> dict:
    """Set γ and β of BatchNorm neurons to 0: the channel outputs a constant 0 (CLP-style pruning)."""
    require_batch_norm(variables, "zeroing BatchNorm neurons")
    size = get_path(variables["params"], _bn_path(bn))["scale"].shape[-1]
    return mask_bn_neurons(variables, bn, _channel_mask(size, channels))


def mask_bn_neurons(variables, bn: ConvUnit | Path, mask) -> dict:
    """``zero_bn_neurons`` with the channels as a bool[C] mask: traceable, so it vmaps over masks."""
    path = _bn_path(bn)
    require_batch_norm(variables, "zeroing BatchNorm neurons")
    params = dict(get_path(variables["params"], path))
    params = {k: jnp.where(mask, 0.0, v) for k, v in params.items()}
    return {**variables, "params": set_path(variables["params"], path, params)}


def reset_bn_neurons(variables, bn: ConvUnit | Path, channels, statistics: bool = True,
                     affine: bool = False) -> dict:
    """Reset BatchNorm neurons: running mean/var to 0/1 and/or γ/β to 1/0."""
    path = _bn_path(bn)
    require_batch_norm(variables, "resetting BatchNorm neurons")
    new = dict(variables)
    if statistics:
        stats = dict(get_path(variables["batch_stats"], path))
        mask = _channel_mask(stats["mean"].shape[-1], channels)
        stats = {"mean": jnp.where(mask, 0.0, stats["mean"]), "var": jnp.where(mask, 1.0, stats["var"])}
        new["batch_stats"] = set_path(variables["batch_stats"], path, stats)
    if affine:
        params = dict(get_path(variables["params"], path))
        mask = _channel_mask(params["scale"].shape[-1], channels)
        params = {"scale": jnp.where(mask, 1.0, params["scale"]), "bias": jnp.where(mask, 0.0, params["bias"])}
        new["params"] = set_path(variables["params"], path, params)
    return new


def _bn_path(bn: ConvUnit | Path) -> Path:
    if isinstance(bn, ConvUnit):
        if bn.bn is None:
            raise ValueError(f"conv {bn.name!r} has no BatchNorm directly after it")
        return bn.bn
    return bn


def replace_batch_stats(variables, batch_stats) -> dict:
    """New variables with ``batch_stats`` swapped in; the two trees must match in structure and shapes."""
    require_batch_norm(variables, "replacing batch_stats")
    old = jax.tree_util.tree_structure(variables["batch_stats"])
    new = jax.tree_util.tree_structure(batch_stats)
    if old != new:
        raise ValueError(f"batch_stats structure does not match the model's:\n{new}\nvs\n{old}")
    for a, b in zip(jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(batch_stats)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"batch_stats leaf shape {jnp.shape(b)} does not match the model's {jnp.shape(a)}")
    return {**variables, "batch_stats": batch_stats}


def batch_moments(module, variables, images) -> dict:
    """Per-BatchNorm mean and (biased) variance of ``images``' pre-BN activations, as a
    ``batch_stats``-shaped pytree. Each BN sees the activations produced by the model in
    train mode, which is what a train-mode forward pass would fold into its running stats.
    """
    require_batch_norm(variables, "batch_moments")
    # A BN layer updates stat <- m * stat + (1 - m) * batch; starting from zeros recovers batch.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    momentum = BN_MOMENTUM
    _, updates = module.apply({**variables, "batch_stats": zeros}, images, train=True,
                              mutable=["batch_stats"])
    return jax.tree_util.tree_map(lambda s: s / (1.0 - momentum), updates["batch_stats"])


# --------------------------------------------------------------------------- optimiser masks
def bn_param_mask(variables) -> dict:
    """Pytree of bools over ``params``: True for BatchNorm γ/β (entries that also have batch_stats)."""
    require_batch_norm(variables, "a BatchNorm-only optimiser")
    bn_paths = {path[:-1] for path, _ in _leaf_paths(variables["batch_stats"])}

    def mark(path, _):
        return tuple(getattr(k, "key", k) for k in path[:-1]) in bn_paths

    return jax.tree_util.tree_map_with_path(mark, variables["params"])


def _leaf_paths(tree):
    return [(tuple(getattr(k, "key", k) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def only_bn_params(optimizer: optax.GradientTransformation, variables) -> optax.GradientTransformation:
    """``optimizer`` on BatchNorm γ/β; every other parameter gets a zero update (frozen)."""
    labels = jax.tree_util.tree_map(lambda is_bn: "bn" if is_bn else "frozen", bn_param_mask(variables))
    return optax.multi_transform({"bn": optimizer, "frozen": optax.set_to_zero()}, labels)
