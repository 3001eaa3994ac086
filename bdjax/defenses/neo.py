"""NEO (Udeshi et al., "Model agnostic defence against backdoor attacks in machine learning",
IEEE Trans. Reliability 2022; arXiv:1908.02203), the input filter CETF's paper compares with.

For each input x with prediction f(x):

1. Blocking: a square *blocker* filled with x's dominant colour (the centre of the largest of
   k = 3 k-means clusters of its pixels) is placed at every position of a grid; a position
   where the prediction changes may hide a trigger.
2. Confirmation: the pixels of x under such a blocker are pasted at the same position on
   clean images; if at least ``confirm_threshold`` (80%) of those not already predicted f(x)
   switch to f(x), the region is a trigger and x is flagged.

NEO searches positions at random and stops at the first confirmed one; here every grid
position is blocked at once (a ``vmap`` over positions) and the ``max_candidates`` transitions
whose blocking lowers the probability of f(x) the most are confirmed (also vmapped), so an
input is flagged iff one of them is confirmed. Inputs are a further ``vmap`` axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.cetf import filter_flips, region_mask
from bdjax.defenses.strip import check_inputs


@dataclasses.dataclass(frozen=True)
class NEOConfig:
    """NEO's settings.

    From NEO's code (github.com/sakshiudeshi/Neo): ``kmeans_clusters`` 3 (dominant colour),
    ``num_confirm`` 20 clean images for confirmation, ``confirm_threshold`` 0.8 (MNIST:
    "confirmation score >= 0.8"; TrojanZoo's port: 80%). NEO sizes the blocker like the trigger
    (its authors assume the defender knows it); we do not: ``blocker_size`` 4 px (1/8 of a 32 px
    side) with ``stride`` 2 covers any trigger of up to 3x3 px whole at some grid position
    (size >= trigger + stride − 1). ``max_candidates`` transitions are confirmed per input;
    ``kmeans_iterations`` Lloyd steps; ``batch_size`` inputs per vmapped chunk.
    """

    blocker_size: int = 4
    stride: int = 2
    num_confirm: int = 20
    confirm_threshold: float = 0.8
    max_candidates: int = 16
    kmeans_clusters: int = 3
    kmeans_iterations: int = 10
    batch_size: int = 4


def blocker_positions(height: int, width: int, size: int, stride: int) -> np.ndarray:
    """int32[P, 2] (top, left) of a size x size blocker on a ``stride`` grid; the last row and
    column of blockers touch the image border, so the blockers cover every pixel."""
    if not 1 <= size <= min(height, width) or stride < 1:
        raise ValueError(f"blocker size must lie in [1, {min(height, width)}] and stride >= 1, "
                         f"got size {size}, stride {stride}")

    def starts(extent):
        grid = list(range(0, extent - size + 1, stride))
        return grid if grid[-1] == extent - size else grid + [extent - size]

    tops, lefts = np.meshgrid(starts(height), starts(width), indexing="ij")
    return np.stack([tops.ravel(), lefts.ravel()], axis=1).astype(np.int32)


def dominant_colour(image, clusters: int = 3, iterations: int = 10) -> jax.Array:
    """Centre of the most populated k-means cluster of the pixels of ``image`` (f32[H, W, C]).

    Lloyd's algorithm from a deterministic start: the pixels at evenly spaced brightness ranks.
    """
    pixels = image.reshape(-1, image.shape[-1])
    order = jnp.argsort(pixels.sum(axis=-1))
    ranks = jnp.round(jnp.linspace(0, pixels.shape[0] - 1, clusters)).astype(jnp.int32)
    start = pixels[order[ranks]]

    def assign(centres):
        distances = jnp.sum((pixels[:, None, :] - centres[None, :, :]) ** 2, axis=-1)
        return jax.nn.one_hot(jnp.argmin(distances, axis=-1), clusters, dtype=pixels.dtype)

    def lloyd(_, centres):
        members = assign(centres)
        counts = members.sum(axis=0)
        means = (members.T @ pixels) / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where((counts > 0)[:, None], means, centres)  # an empty cluster keeps its centre

    centres = jax.lax.fori_loop(0, iterations, lloyd, start)
    return centres[jnp.argmax(assign(centres).sum(axis=0))]


def block(image, box, colour) -> jax.Array:
    """``image`` (f32[H, W, C]) with the region box = (top, left, height, width) set to ``colour``."""
    mask = region_mask(box, *image.shape[:2])[:, :, None]
    return jnp.where(mask, jnp.broadcast_to(colour, image.shape), image)


def neo_score(logits_fn, image, predicted, colour, boxes, confirm, confirm_predicted,
              max_candidates: int = 16) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NEO on one input: (best confirmation fraction, its box f32[4], number of transitions).

    image: f32[H, W, C]; boxes: f32[P, 4] blocker regions; confirm: f32[M, H, W, C] clean
    images with their predictions confirm_predicted: int32[M]. A box counts only if blocking
    it changes the prediction; the fraction is 0 when no box does.
    """
    blocked = jax.vmap(block, in_axes=(None, 0, None))(image, boxes, colour)
    probs = jax.nn.softmax(logits_fn(blocked), axis=-1)
    transition = jnp.argmax(probs, axis=-1) != predicted
    priority = jnp.where(transition, -probs[:, predicted], -jnp.inf)
    _, candidates = jax.lax.top_k(priority, min(max_candidates, boxes.shape[0]))
    fractions = jax.vmap(lambda box: filter_flips(logits_fn, image, predicted, box, confirm, confirm_predicted))(
        boxes[candidates])
    fractions = jnp.where(transition[candidates], fractions, 0.0)
    best = jnp.argmax(fractions)
    return fractions[best], boxes[candidates[best]], transition.sum()


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _screen(module, variables, images, boxes, confirm, max_candidates, clusters, iterations, batch_size):
    def logits_fn(batch):
        return module.apply(variables, batch, train=False)

    confirm_predicted = jnp.argmax(logits_fn(confirm), axis=-1)

    def one(image):
        label = jnp.argmax(logits_fn(image[None])[0])
        colour = dominant_colour(image, clusters, iterations)
        return label, *neo_score(logits_fn, image, label, colour, boxes, confirm, confirm_predicted, max_candidates)

    return jax.lax.map(one, images, batch_size=batch_size)


@dataclasses.dataclass
class Screening:
    """NEO's verdict on N inputs (NumPy)."""

    poisoned: np.ndarray  # bool[N]
    predicted: np.ndarray  # int32[N] f(x)
    score: np.ndarray  # f32[N] best confirmation fraction
    box: np.ndarray  # int32[N, 4] its blocker (top, left, height, width)
    transitions: np.ndarray  # int32[N] blocker positions that changed the prediction


def screen(module, variables, images: np.ndarray, confirm: np.ndarray, config: NEOConfig = NEOConfig()) -> Screening:
    """Run NEO on ``images`` (uint8[N, H, W, C]) with ``confirm`` (uint8[M, H, W, C]) clean images."""
    images = check_inputs(images, np.shape(confirm)[1:], "NEO")
    n = len(images)
    height, width = images.shape[1:3]
    positions = blocker_positions(height, width, config.blocker_size, config.stride)
    size = np.full((len(positions), 2), config.blocker_size)
    boxes = jnp.asarray(np.concatenate([positions, size], axis=1), jnp.float32)
    if n == 0:
        empty = np.zeros((0,), np.int32)
        return Screening(empty.astype(bool), empty, empty.astype(np.float32), np.zeros((0, 4), np.int32), empty)
    predicted, scores, best, transitions = jax.device_get(_screen(
        module, variables, jnp.asarray(to_float(images)), boxes, jnp.asarray(to_float(confirm)),
        config.max_candidates, config.kmeans_clusters, config.kmeans_iterations,
        max(1, min(config.batch_size, n))))
    return Screening(scores >= config.confirm_threshold, predicted.astype(np.int32), scores,
                     best.astype(np.int32), transitions.astype(np.int32))


def confirmation_set(clean: Dataset, key, config: NEOConfig) -> np.ndarray:
    """uint8[M, H, W, C]: ``num_confirm`` random images of the clean set (all if it is smaller)."""
    check_clean_set(clean, "NEO")
    order = np.asarray(jax.random.permutation(key, len(clean)))
    return clean.images[order[:config.num_confirm]]


@register("neo", NEOConfig, kind="input filter",
          paper="Udeshi et al., IEEE Trans. Reliability 2022",
          detector=True, summary="NEO input filter (dominant-colour blocker + confirmation)")
def neo(module, variables, clean: Dataset, key, config: NEOConfig = NEOConfig()) -> DefenseResult:
    """NEO as an input filter: the classifier rejects every input with a confirmed trigger.

    The confirmation images are drawn from ``clean``; NEO has no other use for them.
    ``info["screened"]`` gets, per classifier call, how many inputs were flagged.
    """
    confirm = confirmation_set(clean, key, config)
    info: dict = {"num_confirm": len(confirm), "screened": []}

    def classify(images):
        found = screen(module, variables, images, confirm, config)
        info["screened"].append({"flagged": int(found.poisoned.sum()), "count": len(found.poisoned),
                                 "boxes": found.box[found.poisoned][:8].tolist()})
        return found.predicted, found.poisoned

    return DefenseResult(variables, classifier=classify, info=info)
