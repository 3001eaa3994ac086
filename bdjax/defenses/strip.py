"""STRIP: STRong Intentional Perturbation (Gao et al., "STRIP: a defence against trojan attacks
on deep neural networks", ACSAC 2019), the input filter CETF's paper compares with.

Each input x is superimposed on N clean images, x_i = clip(a·x + b·c_i, 0, 1), and the entropy of the
model's prediction is averaged over the N blends (eq. 2-4 of STRIP, in bits). A trigger keeps
pulling the blends to its target class, so a triggered input has a *low* entropy. The threshold
is a quantile of the defender's clean images' own entropies: flagging below the q-quantile
rejects a fraction q of clean inputs (the false-positive rate STRIP picks, 1% by default).

Everything for a set of inputs is one compiled program: inputs are a ``vmap`` axis (in chunks
of ``batch_size``, ``lax.map``) and each input's N blends are one batch through the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.models.inference import predict


@dataclasses.dataclass(frozen=True)
class STRIPConfig:
    """STRIP's settings; defaults from STRIP (sec. V) and the CETF paper's description.

    - ``num_overlays`` N = 100 clean images per input (STRIP's choice; drawn with replacement
      from the defender's clean set, which here may hold fewer than 100 images);
    - ``input_weight`` a = 0.5 and ``overlay_weight`` b = 0.5: the linear blend the CETF paper
      describes STRIP with; STRIP's own code superimposes with ``cv2.addWeighted(x, 1, c, 1, 0)``,
      i.e. a = b = 1 with saturation (set both to 1.0 for that variant);
    - ``false_positive_rate`` 0.01: the threshold is the clean set's entropy quantile at this
      rate (STRIP's 1%; ``0.15`` is the setting the BNA paper compares against);
    - ``batch_size`` inputs go through the model together (each as N blends).
    """

    num_overlays: int = 100
    input_weight: float = 0.5
    overlay_weight: float = 0.5
    false_positive_rate: float = 0.01
    batch_size: int = 16


def check_inputs(images, image_shape, method: str) -> np.ndarray:
    """``images`` as uint8[N, H, W, C] with the clean set's (H, W, C), or a clear error."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{method} screens stored uint8 pixels [N, H, W, C], got dtype {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{method} screens images of shape [N, {', '.join(map(str, image_shape))}] "
                         f"(the clean set's), got {images.shape}")
    return images


def prediction_entropy(logits) -> jax.Array:
    """Shannon entropy in bits of softmax(logits): f32[..., classes] -> f32[...]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) / jnp.log(2.0)


def blend_entropy(logits_fn, image, overlays, input_weight: float = 0.5, overlay_weight: float = 0.5) -> jax.Array:
    """STRIP's normalised entropy of one input: the mean entropy of its N blends
    clip(input_weight·image + overlay_weight·overlay, 0, 1).

    image: f32[H, W, C]; overlays: f32[N, H, W, C]; logits_fn: f32[M, H, W, C] -> f32[M, classes].
    """
    blends = jnp.clip(input_weight * image[None] + overlay_weight * overlays, 0.0, 1.0)
    return prediction_entropy(logits_fn(blends)).mean()


def overlay_indices(key, count: int, pool: int, overlays: int, exclude_self: bool = False) -> jax.Array:
    """int32[count, overlays]: random draws (with replacement) from ``range(pool)``; with
    ``exclude_self`` row i never holds i (the inputs are the pool itself)."""
    if not exclude_self:
        return jax.random.randint(key, (count, overlays), 0, pool)
    draw = jax.random.randint(key, (count, overlays), 0, pool - 1)
    return draw + (draw >= jnp.arange(count)[:, None])  # skip index i


@functools.partial(jax.jit, static_argnums=(0, 6))
def _entropies(module, variables, images, clean, indices, weights, batch_size):
    def logits_fn(batch):
        return module.apply(variables, batch, train=False)

    def one(args):
        image, overlays = args
        return blend_entropy(logits_fn, image, clean[overlays], weights[0], weights[1])

    return jax.lax.map(one, (images, indices), batch_size=batch_size)


def entropies(module, variables, images: np.ndarray, clean: np.ndarray, key, config: STRIPConfig = STRIPConfig(),
              exclude_self: bool = False) -> np.ndarray:
    """f32[N] STRIP entropy of every input (uint8[N, H, W, C]) blended with images of ``clean``.

    Each input gets its own N random overlays. ``exclude_self``: ``images`` *is* ``clean`` and
    image i never overlays itself (used for the threshold).
    """
    images, clean = np.asarray(images), np.asarray(clean)
    n = len(images)
    if n == 0:
        return np.zeros((0,), np.float32)
    indices = overlay_indices(key, n, len(clean), config.num_overlays, exclude_self)
    values = _entropies(module, variables, jnp.asarray(to_float(images)), jnp.asarray(to_float(clean)),
                        indices, jnp.array([config.input_weight, config.overlay_weight], jnp.float32),
                        max(1, min(config.batch_size, n)))
    return np.asarray(values)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """STRIP's decision rule: an input whose entropy is below ``value`` is triggered."""

    value: float
    clean_entropies: np.ndarray  # f32[M] of the defender's clean images

    def flags(self, input_entropies) -> np.ndarray:
        return np.asarray(input_entropies) < self.value


def clean_threshold(module, variables, clean: Dataset, key, config: STRIPConfig = STRIPConfig()) -> Threshold:
    """The ``false_positive_rate`` quantile of the clean set's entropies (each clean image is
    blended with the *other* clean images)."""
    check_clean_set(clean, "STRIP", min_size=2)
    if not 0.0 < config.false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must lie in (0, 1), got {config.false_positive_rate}")
    values = entropies(module, variables, clean.images, clean.images, key, config, exclude_self=True)
    return Threshold(float(np.quantile(values, config.false_positive_rate)), values)


@register("strip", STRIPConfig, kind="input filter",
          paper="Gao et al., ACSAC 2019",
          detector=True, summary="STRIP input filter (rejects low-entropy blends)")
def strip(module, variables, clean: Dataset, key, config: STRIPConfig = STRIPConfig()) -> DefenseResult:
    """STRIP as an input filter: the classifier rejects every input whose blend entropy is below
    the clean-set threshold. ``info`` holds the threshold, the clean entropies and, per
    classifier call, the entropies of the inputs."""
    threshold_key, run_key = jax.random.split(key)
    threshold = clean_threshold(module, variables, clean, threshold_key, config)
    info: dict = {"threshold": threshold.value, "clean_entropies": threshold.clean_entropies.tolist(),
                  "screened": []}

    def classify(images):
        images = check_inputs(images, clean.images.shape[1:], "STRIP")
        values = entropies(module, variables, images, clean.images,
                           jax.random.fold_in(run_key, len(info["screened"])), config)
        info["screened"].append({"entropy_mean": float(values.mean()) if len(values) else float("nan"),
                                 "flagged": int(threshold.flags(values).sum()), "count": len(values)})
        return predict(module, variables, images), threshold.flags(values)

    return DefenseResult(variables, classifier=classify, info=info)
