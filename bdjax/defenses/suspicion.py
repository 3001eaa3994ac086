"""Backdoor suspiciousness score pruning with a tiny clean set.

Hashemifar, Parsa & Zakeri-Nasrabadi, "Mitigating Backdoors within Deep Neural Networks in
Data-limited Configuration" (``papers/suspiciousness-pruning.md``). For every channel n of a
BN-paired conv, four heuristics measured on the defense set D:

- spectral norm (eq. 1): σ_max of the BN-merged kernel, CLP's channel Lipschitz constant;
- saliency (eq. 3): Σ_{(x,y)∈D} mean_{w∈n} |∂ℓ(x, y)/∂w| over the channel's kernel weights;
- activation norm (eq. 4): mean_{x∈D} ‖activation_n(x)‖₂ of the post-BN output;
- correlation (eq. 5): corrcoef over D of per-image activation norms with the other channels
  of the layer, aggregated and normalised to [0, 1] (see ``correlation_with_layer``).

score (eq. 6) = sqrt(saliency / (correlation × activation norm)) × spectral norm; per layer,
channels with score > mean_l + μ · std_l have γ and β of their BN neuron zeroed (Alg. 1).

``suspicion_scores`` measures everything once; ``prune`` / ``sweep_mu`` only threshold, so a
μ sweep (Fig. 3) or the heuristic ablation (Table III) never touches the data again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import sharding, surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register, register_batched
from bdjax.defenses.channel_lipschitz import (bn_units_or_raise, lipschitz_of_units, mask_bn_channels,
                                              outliers_above, prune_bn_channels)
from bdjax.models.base import ConvUnit

MEASURES = ("spectral", "saliency", "activation", "correlation")
HEURISTICS = ("score", "score_no_sqrt", *MEASURES)


@dataclasses.dataclass(frozen=True)
class SuspicionConfig:
    """Defaults from Hashemifar et al.

    mu: 3.5. Fig. 3 / RQ3: "a value between 3 and 4 generalizes well on different attacks"
        (3 is best for Blend, ≥ 4 prunes nothing for BadNets/Blend); we take the middle.
    heuristic: "score" is eq. 6; "score_no_sqrt" and the four single heuristics are the
        columns of the ablation, Table III (orientation: high = suspicious, see ``suspiciousness``).
    eps: guard of the divisions in eq. 6 and in corrcoef (not in the paper, which does not
        say how it avoids dividing by a zero activation norm or correlation).
    chunk_size: images per vmapped per-example-gradient batch (memory only; no effect on
        the result).
    """

    mu: float = 3.5
    heuristic: str = "score"
    eps: float = 1e-8
    chunk_size: int = 16

    def __post_init__(self):
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"heuristic must be one of {HEURISTICS}, got {self.heuristic!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# --------------------------------------------------------------------------- measuring
def correlation_with_layer(norms: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Per-channel correlation of activation norms with the rest of its layer (eq. 5).

    norms: f32[N, C] (‖activation_n(x)‖₂ per image and channel) -> f32[C] in [0, 1].

    The paper computes corrcoef(i, j) for all channel pairs and "normalize[s] all correlation
    values within the range of [0, 1]" without naming the aggregation. We take the mean
    |corrcoef| with the C - 1 other channels: the paper's point is a channel's *independence*
    from its layer (Sec. III-D), and a strong negative correlation is dependence too. That
    mean already lies in [0, 1]; we divide by the layer's maximum so the most correlated
    channel is 1. (Min-max scaling would map the least correlated channel of *every* layer
    to 0 and make its eq.-6 score infinite, i.e. always prune one channel per layer; a
    per-layer factor does not change which channels pass mean + μ · std.) A channel whose
    norm is constant over D (dead) gets correlation 0 (eps-guarded corrcoef).
    """
    centred = norms - jnp.mean(norms, axis=0, keepdims=True)
    cov = centred.T @ centred
    std = jnp.sqrt(jnp.diag(cov))
    corr = cov / jnp.maximum(std[:, None] * std[None, :], eps)
    channels = corr.shape[0]
    others = ~jnp.eye(channels, dtype=bool)
    mean_abs = jnp.sum(jnp.where(others, jnp.abs(corr), 0.0), axis=1) / max(channels - 1, 1)
    return mean_abs / jnp.maximum(jnp.max(mean_abs), eps)


@functools.partial(jax.jit, static_argnames=("module", "units", "count", "eps"))
def _measure(params, batch_stats, images, labels, weights, *, module, units: tuple[ConvUnit, ...],
             count: int, eps: float) -> dict:
    """Every heuristic of every unit in one compiled program.

    images f32[K, B, H, W, C], labels int32[K, B], weights f32[K, B] (0 = padding; the first
    ``count`` of the K·B images are real). Returns ``{unit name: {measure: f32[C]}}``.
    """
    rest = {"batch_stats": batch_stats}

    def per_image(p, image, label):
        logits, captured = surgery.apply_with_edits(module, {**rest, "params": p}, image[None],
                                                    capture=[u.output for u in units])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label[None])[0]
        # ‖·‖₂ of the channel's whole feature map: sqrt over h, w of the squared outputs.
        norms = {u.name: jnp.sqrt(jnp.sum(jnp.square(captured[u.output][0]), axis=(0, 1)))
                 for u in units}
        return loss, norms

    per_image_grad = jax.vmap(jax.grad(per_image, has_aux=True), in_axes=(None, 0, 0))

    def chunk_step(saliency, chunk):
        chunk_images, chunk_labels, chunk_weights = chunk
        grads, norms = per_image_grad(params, chunk_images, chunk_labels)
        # |∂ℓ/∂w| per image (eq. 3 sums magnitudes, not the magnitude of the summed gradient),
        # averaged over the channel's kernel weights [kh, kw, C_in].
        saliency = {u.name: saliency[u.name] + jnp.einsum(
            "b,bc->c", chunk_weights,
            jnp.mean(jnp.abs(surgery.get_path(grads, u.conv)["kernel"]), axis=(1, 2, 3)))
            for u in units}
        return saliency, norms

    zeros = {u.name: jnp.zeros((surgery.get_path(params, u.conv)["kernel"].shape[-1],), jnp.float32)
             for u in units}
    saliency, norms = jax.lax.scan(chunk_step, zeros, (images, labels, weights))
    spectral = lipschitz_of_units(params, batch_stats, units)
    scores = {}
    for u in units:
        valid = norms[u.name].reshape(-1, norms[u.name].shape[-1])[:count]  # f32[count, C]
        activation = jnp.mean(valid, axis=0)
        correlation = correlation_with_layer(valid, eps)
        ratio = saliency[u.name] / jnp.maximum(correlation * activation, eps)
        scores[u.name] = {"spectral": spectral[u.name], "saliency": saliency[u.name],
                          "activation": activation, "correlation": correlation,
                          "score": jnp.sqrt(ratio) * spectral[u.name],
                          "score_no_sqrt": ratio * spectral[u.name]}
    return scores


def suspicion_scores(module, variables, clean: Dataset, eps: float = SuspicionConfig.eps,
                     chunk_size: int = SuspicionConfig.chunk_size) -> dict[str, dict[str, np.ndarray]]:
    """Measure every heuristic for every BN-paired conv unit, once.

    Returns ``{unit name: {"spectral", "saliency", "activation", "correlation", "score",
    "score_no_sqrt": f32[C]}}`` (raw measurements; ``suspiciousness`` orients them).
    """
    units = bn_units_or_raise(module, variables, "suspiciousness pruning")
    # corrcoef over images is undefined for a single image.
    check_clean_set(clean, "suspiciousness pruning (its correlation heuristic)", min_size=2)
    count = len(clean)
    chunk = min(chunk_size, count)
    padded = -(-count // chunk) * chunk
    pad = padded - count
    images = np.concatenate([clean.floats(), np.zeros((pad, *clean.images.shape[1:]), np.float32)])
    labels = np.concatenate([clean.labels, np.zeros((pad,), np.int32)])
    weights = np.concatenate([np.ones((count,), np.float32), np.zeros((pad,), np.float32)])
    shape = (padded // chunk, chunk)
    scores = _measure(variables["params"], variables["batch_stats"],
                      images.reshape(*shape, *images.shape[1:]), labels.reshape(shape),
                      weights.reshape(shape), module=module, units=units, count=count, eps=float(eps))
    return jax.device_get(scores)


# --------------------------------------------------------------------------- pruning
def suspiciousness(measures: dict, heuristic: str = "score", eps: float = SuspicionConfig.eps) -> jax.Array:
    """f32[C], high = suspicious, for one unit's ``measures`` (an entry of ``suspicion_scores``).

    Eq. 6 wants high spectral norm and saliency, low activation norm and correlation, so the
    last two alone are used as 1 / value (Table III prunes by each heuristic alone).
    """
    if heuristic not in HEURISTICS:
        raise ValueError(f"heuristic must be one of {HEURISTICS}, got {heuristic!r}")
    value = jnp.asarray(measures[heuristic])
    if heuristic in ("activation", "correlation"):
        return 1.0 / jnp.maximum(value, eps)
    return value


@functools.partial(jax.jit, static_argnames=("heuristic", "eps"))
def suspicious_channels(scores: dict, mu, heuristic: str = "score",
                        eps: float = SuspicionConfig.eps) -> dict[str, jax.Array]:
    """``{unit name: bool[C]}``: score > mean_l + μ · std_l within each layer (Alg. 1, line 5).

    Pure jnp in ``mu``: ``jax.vmap`` over an array of μ gives the masks of a whole sweep.
    """
    return {name: outliers_above(suspiciousness(m, heuristic, eps), mu) for name, m in scores.items()}


def prune(module, variables, scores: dict, mu: float = SuspicionConfig.mu, heuristic: str = "score",
          eps: float = SuspicionConfig.eps) -> tuple[dict, dict[str, list[int]]]:
    """Zero γ and β of the suspicious channels (Alg. 1, line 6).

    Returns ``(new variables, {unit name: pruned channel indices})``; no data is touched.
    """
    return prune_bn_channels(module, variables, suspicious_channels(scores, mu, heuristic, eps))


def sweep_mu(module, variables, scores: dict, mus, heuristic: str = "score",
             eps: float = SuspicionConfig.eps) -> list[tuple[dict, dict[str, list[int]]]]:
    """``prune`` for every μ in ``mus`` from one set of scores (Fig. 3's sweep).

    The masks of all μ come from one vmapped thresholding; returns ``[(variables, pruned)]``
    in the order of ``mus``.
    """
    mus = jnp.asarray(mus, jnp.float32)
    masks = jax.device_get(jax.vmap(lambda mu: suspicious_channels(scores, mu, heuristic, eps))(mus))
    return [prune_bn_channels(module, variables, {name: m[i] for name, m in masks.items()})
            for i in range(mus.shape[0])]


@register("suspicion", SuspicionConfig, kind="pruning",
          paper="Hashemifar, Parsa & Zakeri-Nasrabadi (data-limited backdoor mitigation)",
          summary="prune channels with an outlying backdoor suspiciousness score (tiny clean set)")
def suspicion_pruning(module, variables, clean: Dataset, key,
                      config: SuspicionConfig = SuspicionConfig()) -> DefenseResult:
    """Measure the four heuristics on ``clean`` and prune per-layer outliers of ``config.heuristic``.

    Deterministic: ``key`` is unused.
    """
    del key
    scores = suspicion_scores(module, variables, clean, config.eps, config.chunk_size)
    new_variables, pruned = prune(module, variables, scores, config.mu, config.heuristic, config.eps)
    return DefenseResult(new_variables, info={
        "scores": scores, "pruned": pruned, "pruned_count": sum(len(c) for c in pruned.values()),
    })


@register_batched("suspicion", axes=("mu",))
def suspicion_many(module, variables, clean: Dataset, key, config: SuspicionConfig, values: dict, mesh=None):
    """Suspicion pruning for every μ in ``values["mu"]``: the scores are measured once."""
    del key
    scores = suspicion_scores(module, variables, clean, config.eps, config.chunk_size)

    def one(mu):
        return mask_bn_channels(module, variables, suspicious_channels(scores, mu, config.heuristic, config.eps))
    return jax.jit(jax.vmap(one))(sharding.shard_leading(jnp.asarray(values["mu"], jnp.float32), mesh))
