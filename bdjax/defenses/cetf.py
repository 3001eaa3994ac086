"""CETF: CAM-focus Evolutionary Trigger Filter (Zhou et al., "Evolutionary trigger detection and
lightweight model repair based backdoor defense", sec. III-C to III-E).

For each input x with prediction f(x):

1. CAM-focus (III-C): Grad-CAM of f(x); pixels >= 0.7 of the normalised map; their minimum
   bounding rectangle, dilated, is the *prior region*.
2. Differential evolution (III-D) inside the prior region: individual u = (top, left, height,
   width), DE/current/1/bin (v = u + α(u_r1 − u_r2), α = 0.3, binomial crossover p = 0.5,
   greedy parent/offspring selection), population 40, at most 100 generations, stop after 10
   without improvement of the best. Maximised fitness (eq. 4):
   1000·flag(u) + 1000·flips(u) − s(u)²/S. A best fitness < 0 means "clean".
3. Paste-and-filter (III-E): paste the best region on clean images at the same position;
   if more than 50% of them switch to f(x), x is poisoned and the region is its trigger.

The search for a batch of images is one jit-compiled program: images and population members
are ``vmap`` axes and the generations a ``lax.while_loop``. The DE is evosax's strategy
interface (init / ask / tell over ``flax.struct`` state); evosax's own DE cannot use the member
itself as the mutation base, so ``CETFDifferentialEvolution`` overrides only ``_ask``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms.population_based.differential_evolution import (
    DifferentialEvolution,
    Params,
)

from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.gradcam import grad_cam
from bdjax.models.inference import predict


@dataclasses.dataclass(frozen=True)
class CETFConfig:
    """CETF's settings; defaults from the paper (sec. III and IV-B).

    - ``population_size`` 40, ``differential_weight`` α = 0.3, ``crossover_rate`` p = 0.5,
      ``max_generations`` 100, ``patience`` 10 (III-D; Tables IV-V pick 40 and 0.3);
    - ``cam_threshold`` 0.7 (III-C); ``dilation``: the paper dilates the bounding rectangle
      without saying by how much; we grow it by 1/8 of the image side on every side (4 px
      on 32x32 inputs), enough to recover a patch that the coarse last-layer map cuts off;
    - ``flag_weight`` = ``flips_weight`` = 1000 and h = ``num_auxiliary`` = 10 (eq. 4);
    - ``filter_threshold`` 0.5 (III-E, "Threshold selection").
    ``num_filter`` (how many clean images paste-and-filter uses; the paper does not say) takes
    the defender's clean images not used as auxiliary ones, at most this many.
    ``batch_size`` images are searched per compiled call; ``feature_layer`` overrides the
    Grad-CAM layer (a module path, e.g. ``("bn2",)``); ``sample_size`` images per call keep
    their region and fitness history in ``info``.

    Not in the paper (an ablation of ours, off by default): ``max_region`` (a fraction of the
    image area) makes a region larger than it a clean feature whatever paste-and-filter says;
    ``calibration_size`` > 0 has ``cetf`` and the CETF repairs set ``max_region`` from the
    defender's clean set alone (see ``calibrate_max_region``). On zoo v2's GTSRB ResNet-20 the
    regions CETF finds on clean inputs are the signs' pictograms (~200 pixels), which flip other
    signs as a trigger does, while those on triggered inputs cover the patch (~15 pixels).
    """

    population_size: int = 40
    differential_weight: float = 0.3
    crossover_rate: float = 0.5
    max_generations: int = 100
    patience: int = 10
    cam_threshold: float = 0.7
    dilation: float = 0.125
    num_auxiliary: int = 10
    flag_weight: float = 1000.0
    flips_weight: float = 1000.0
    filter_threshold: float = 0.5
    num_filter: int = 100
    batch_size: int = 4
    feature_layer: tuple[str, ...] | None = None
    sample_size: int = 8
    max_region: float | None = None
    calibration_size: int = 0

    def __post_init__(self):
        if self.max_region is not None and not 0.0 <= self.max_region <= 1.0:
            raise ValueError(f"max_region is a fraction of the image area in [0, 1], got {self.max_region}")
        if not 0 <= self.calibration_size <= self.num_filter:
            raise ValueError(f"calibration_size must be in [0, num_filter = {self.num_filter}], "
                             f"got {self.calibration_size}")
        if self.calibration_size and self.max_region is not None:
            raise ValueError("give max_region or calibration_size (which sets max_region), not both")


# --------------------------------------------------------------------------- CAM-focus
def prior_region(cam, threshold: float = 0.7, dilation: int = 4) -> jax.Array:
    """Dilated minimum bounding rectangle of ``cam >= threshold``.

    cam: f32[H, W] in [0, 1]. Returns int32[4] = (top, left, bottom, right), bottom/right
    exclusive, clipped to the image; the whole image when no pixel reaches the threshold.
    """
    height, width = cam.shape
    hot = cam >= threshold
    rows, cols = hot.any(axis=1), hot.any(axis=0)
    found = rows.any()
    top = jnp.where(found, jnp.argmax(rows), 0)
    bottom = jnp.where(found, height - jnp.argmax(rows[::-1]), height)
    left = jnp.where(found, jnp.argmax(cols), 0)
    right = jnp.where(found, width - jnp.argmax(cols[::-1]), width)
    box = jnp.stack([jnp.maximum(top - dilation, 0), jnp.maximum(left - dilation, 0),
                     jnp.minimum(bottom + dilation, height), jnp.minimum(right + dilation, width)])
    return box.astype(jnp.int32)


# --------------------------------------------------------------------------- the DE variant
class CETFDifferentialEvolution(DifferentialEvolution):
    """evosax DE with CETF's mutation and crossover (eqs. 1-3), i.e. DE/current/1/bin.

    v_i = u_i + α (u_r1 − u_r2) with r1 ≠ r2 ≠ i drawn uniformly; each coordinate of the
    offspring comes from v_i with probability p (no forced coordinate); evosax's ``tell``
    keeps the better of parent and offspring (greedy selection). evosax minimises, so pass
    the negated CETF fitness.
    """

    @property
    def _default_params(self) -> Params:
        return Params(elitism=False, crossover_rate=0.5, differential_weight=0.3,
                      differential_weight_min=0.3, differential_weight_max=0.3)

    def _ask(self, key, state, params):
        members = jnp.arange(self.population_size)

        def ask_member(key, member):
            pick_key, cross_key = jax.random.split(key)
            others = jnp.ones(self.population_size).at[member].set(0.0)
            r1, r2 = jax.random.choice(pick_key, self.population_size, (2,), replace=False,
                                       p=others / others.sum())
            parent = state.population[member]
            mutant = parent + params.differential_weight * (state.population[r1] - state.population[r2])
            take = jax.random.uniform(cross_key, (self.num_dims,)) < params.crossover_rate
            return jnp.where(take, mutant, parent)

        keys = jax.random.split(key, self.population_size)
        return jax.vmap(ask_member)(keys, members), state


def decode(individual, prior) -> jax.Array:
    """Nearest valid pixel rectangle inside ``prior``.

    individual: f32[4] = (top, left, height, width); prior: int32[4] = (top, left, bottom,
    right). Returns f32[4] with integer values, height/width >= 1, the rectangle inside prior.
    """
    top0, left0, bottom, right = (prior[i].astype(jnp.float32) for i in range(4))
    height = jnp.clip(jnp.round(individual[2]), 1.0, bottom - top0)
    width = jnp.clip(jnp.round(individual[3]), 1.0, right - left0)
    top = jnp.clip(jnp.round(individual[0]), top0, bottom - height)
    left = jnp.clip(jnp.round(individual[1]), left0, right - width)
    return jnp.stack([top, left, height, width])


def region_mask(box, height: int, width: int) -> jax.Array:
    """bool[H, W]: True inside box = (top, left, height, width)."""
    rows = jnp.arange(height, dtype=jnp.float32)
    cols = jnp.arange(width, dtype=jnp.float32)
    in_rows = (rows >= box[0]) & (rows < box[0] + box[2])
    in_cols = (cols >= box[1]) & (cols < box[1] + box[3])
    return in_rows[:, None] & in_cols[None, :]


def paste(image, box, targets):
    """``targets`` (f32[M, H, W, C]) with the region ``box`` of ``image`` (f32[H, W, C]) pasted in."""
    mask = region_mask(box, *image.shape[:2])[None, :, :, None]
    return jnp.where(mask, jnp.broadcast_to(image, targets.shape), targets)


def fitness(logits_fn, image, predicted, box, auxiliary, auxiliary_predicted,
            flag_weight: float = 1000.0, flips_weight: float = 1000.0) -> jax.Array:
    """CETF fitness (eq. 4, Algorithm 2) of the region ``box`` of ``image``.

    flag = 1 if filling the region with the image's average colour changes the prediction;
    flips = fraction of the auxiliary images (f32[h, H, W, C]) not already predicted as f(x)
    whose prediction becomes f(x) when the region is pasted on them; s = area, S = image area.
    logits_fn: f32[M, H, W, C] -> f32[M, classes].
    """
    height, width = image.shape[:2]
    mask = region_mask(box, height, width)[:, :, None]
    average = jnp.broadcast_to(image.mean(axis=(0, 1)), image.shape)
    masked = jnp.where(mask, average, image)
    logits = logits_fn(jnp.concatenate([masked[None], paste(image, box, auxiliary)]))
    labels = jnp.argmax(logits, axis=-1)
    flag = (labels[0] != predicted).astype(jnp.float32)
    eligible = auxiliary_predicted != predicted
    flips = jnp.sum((labels[1:] == predicted) & eligible) / jnp.maximum(eligible.sum(), 1)
    area = box[2] * box[3]
    return flag_weight * flag + flips_weight * flips - area ** 2 / (height * width)


class Search(NamedTuple):
    """Result of the DE search for a batch of N images."""

    box: jax.Array  # f32[N, 4] best (top, left, height, width)
    fitness: jax.Array  # f32[N] best fitness (eq. 4; < 0 means clean)
    history: jax.Array  # f32[N, max_generations + 1] best fitness per generation (NaN after stop)
    generations: jax.Array  # int32[N] generations run


def search_regions(logits_fn, images, predicted, priors, auxiliary, auxiliary_predicted, key, *,
                   population_size=40, differential_weight=0.3, crossover_rate=0.5,
                   max_generations=100, patience=10, flag_weight=1000.0, flips_weight=1000.0) -> Search:
    """DE trigger search for every image; images and members are vmap axes, generations a while_loop.

    images: f32[N, H, W, C]; predicted: int32[N]; priors: int32[N, 4]; auxiliary: f32[h, H, W, C];
    auxiliary_predicted: int32[h]. Traceable: call it under ``jax.jit``.
    """
    strategy = CETFDifferentialEvolution(population_size, solution=jnp.zeros(4, jnp.float32))
    params = strategy.default_params.replace(differential_weight=differential_weight,
                                             differential_weight_min=differential_weight,
                                             differential_weight_max=differential_weight,
                                             crossover_rate=crossover_rate)

    def search_one(image, label, prior, key):
        def evaluate(population):
            boxes = jax.vmap(decode, in_axes=(0, None))(population, prior)
            values = jax.vmap(lambda b: fitness(logits_fn, image, label, b, auxiliary,
                                                auxiliary_predicted, flag_weight, flips_weight))(boxes)
            return boxes, values

        init_key, loop_key = jax.random.split(key)
        low = jnp.stack([prior[0], prior[1], 1, 1]).astype(jnp.float32)
        high = jnp.stack([prior[2], prior[3], prior[2] - prior[0] + 1,
                          prior[3] - prior[1] + 1]).astype(jnp.float32)
        start = jax.random.uniform(init_key, (population_size, 4), minval=low, maxval=high)
        boxes, values = evaluate(start)
        state = strategy.init(init_key, boxes, -values, params)
        history = jnp.full((max_generations + 1,), jnp.nan).at[0].set(-state.best_fitness)

        def running(carry):
            _, _, generation, stalled, _ = carry
            return (generation < max_generations) & (stalled < patience)

        def generation_step(carry):
            state, key, generation, stalled, history = carry
            key, ask_key, tell_key = jax.random.split(key, 3)
            offspring, state_asked = strategy.ask(ask_key, state, params)
            boxes, values = evaluate(offspring)  # clipped to valid rectangles before selection
            new_state, _ = strategy.tell(tell_key, boxes, -values, state_asked, params)
            improved = new_state.best_fitness < state.best_fitness
            stalled = jnp.where(improved, 0, stalled + 1)
            history = history.at[generation + 1].set(-new_state.best_fitness)
            return new_state, key, generation + 1, stalled, history

        state, _, generations, _, history = jax.lax.while_loop(
            running, generation_step, (state, loop_key, jnp.int32(0), jnp.int32(0), history))
        return state.best_solution, -state.best_fitness, history, generations

    keys = jax.random.split(key, images.shape[0])
    return Search(*jax.vmap(search_one)(images, predicted, priors, keys))


def filter_flips(logits_fn, image, predicted, box, clean, clean_predicted) -> jax.Array:
    """Paste-and-filter (III-E): fraction of clean images (f32[M, H, W, C]) not already
    predicted as f(x) that switch to f(x) when the region ``box`` of ``image`` is pasted on them."""
    labels = jnp.argmax(logits_fn(paste(image, box, clean)), axis=-1)
    eligible = clean_predicted != predicted
    return jnp.sum((labels == predicted) & eligible) / jnp.maximum(eligible.sum(), 1)


@functools.partial(jax.jit, static_argnums=(0, 6), static_argnames=("population_size", "max_generations"))
def _screen_batch(module, variables, images, auxiliary, filter_images, key, feature_layer=None, *,
                  population_size, differential_weight, crossover_rate, max_generations, patience,
                  cam_threshold, dilation, flag_weight, flips_weight):
    def logits_fn(batch):
        return module.apply(variables, batch, train=False)

    cams, predicted = grad_cam(module, variables, images, feature_layer)
    priors = jax.vmap(lambda c: prior_region(c, cam_threshold, dilation))(cams)
    auxiliary_predicted = jnp.argmax(logits_fn(auxiliary), -1)
    found = search_regions(logits_fn, images, predicted, priors, auxiliary, auxiliary_predicted, key,
                           population_size=population_size, differential_weight=differential_weight,
                           crossover_rate=crossover_rate, max_generations=max_generations,
                           patience=patience, flag_weight=flag_weight, flips_weight=flips_weight)
    filter_predicted = jnp.argmax(logits_fn(filter_images), -1)
    switched = jax.vmap(lambda x, y, b: filter_flips(logits_fn, x, y, b, filter_images, filter_predicted))(
        images, predicted, found.box)
    return predicted, priors, found, switched


@dataclasses.dataclass
class Screening:
    """CETF's verdict on N inputs (NumPy)."""

    poisoned: np.ndarray  # bool[N]
    predicted: np.ndarray  # int32[N] f(x)
    box: np.ndarray  # int32[N, 4] best region (top, left, height, width)
    fitness: np.ndarray  # f32[N] best fitness
    switched: np.ndarray  # f32[N] paste-and-filter fraction switched to f(x)
    prior: np.ndarray  # int32[N, 4] prior region (top, left, bottom, right)
    history: np.ndarray  # f32[N, max_generations + 1]
    generations: np.ndarray  # int32[N]

    def triggers(self, images: np.ndarray) -> list[Trigger]:
        """The extracted trigger of every poisoned input (its pixels and position)."""
        out = []
        for i in np.flatnonzero(self.poisoned):
            top, left, height, width = (int(v) for v in self.box[i])
            out.append(Trigger(images[i, top:top + height, left:left + width].copy(), top, left))
        return out

    def sample(self, count: int) -> dict:
        """JSON-friendly regions and fitness histories of the first ``count`` inputs."""
        n = min(count, len(self.poisoned))
        return {"poisoned": self.poisoned[:n].tolist(), "box": self.box[:n].tolist(),
                "prior": self.prior[:n].tolist(), "fitness": self.fitness[:n].tolist(),
                "switched": self.switched[:n].tolist(),
                "history": [h[:g + 1].tolist() for h, g in zip(self.history[:n], self.generations[:n])]}


@dataclasses.dataclass(frozen=True)
class Trigger:
    """An extracted trigger: ``pixels`` uint8[h, w, C] found at (top, left) of its input."""

    pixels: np.ndarray
    top: int
    left: int

    def paste(self, images: np.ndarray) -> np.ndarray:
        """uint8[N, H, W, C] copies of ``images`` with the trigger at its position."""
        out = np.array(images, copy=True)
        height, width = self.pixels.shape[:2]
        out[:, self.top:self.top + height, self.left:self.left + width] = self.pixels
        return out


def auxiliary_split(clean: Dataset, key, config: CETFConfig) -> tuple[np.ndarray, np.ndarray]:
    """(auxiliary uint8[h, ...], filter uint8[M, ...]): disjoint random draws from the clean set."""
    check_clean_set(clean, "CETF", min_size=config.num_auxiliary + max(config.calibration_size, 1))
    order = np.asarray(jax.random.permutation(key, len(clean)))
    auxiliary = clean.images[order[:config.num_auxiliary]]
    filter_images = clean.images[order[config.num_auxiliary:config.num_auxiliary + config.num_filter]]
    return auxiliary, filter_images


def calibrate_max_region(module, variables, clean: Dataset, key, config: CETFConfig) -> tuple[CETFConfig, dict]:
    """``config`` with ``max_region`` set from the defender's clean images alone (an ablation of
    ours, not the paper's): CETF screens the first ``calibration_size`` paste-and-filter images
    with the paper's rule (an image's own paste never counts: it already has its prediction);
    the limit lies just below the smallest region it flags among them, so that none of them would
    be flagged (a flagged one-pixel region: limit 0, nothing is ever flagged). When it flags none,
    there is no limit. ``key``: the one ``cetf`` gets (same auxiliary / filter split). Returns
    (config, info)."""
    if not config.calibration_size:
        return config, {}
    aux_key, _ = jax.random.split(key)  # the split ``cetf`` and the repairs draw from the same key
    auxiliary, filter_images = auxiliary_split(clean, aux_key, config)
    images = filter_images[:config.calibration_size]
    paper_rule = dataclasses.replace(config, calibration_size=0)
    found = screen(module, variables, images, auxiliary, filter_images, jax.random.fold_in(key, 1), paper_rule)
    areas = found.box[:, 2] * found.box[:, 3]
    image_area = images.shape[1] * images.shape[2]
    flagged = areas[found.poisoned]
    limit = None if flagged.size == 0 else max(int(flagged.min()) - 1, 0) / image_area
    info = {"max_region": limit, "calibration_images": len(images),
            "calibration_flagged": int(found.poisoned.sum()), "calibration_areas": areas.tolist()}
    return dataclasses.replace(paper_rule, max_region=limit), info


def within_limit(box: np.ndarray, max_region: float | None, image_shape) -> np.ndarray:
    """bool[N]: the regions ``box`` (int[N, 4], top / left / height / width) no larger than
    ``max_region`` of the area of images of ``image_shape`` ([N,] H, W, C); all True for None."""
    box = np.asarray(box)
    if max_region is None:
        return np.ones(len(box), bool)
    height, width = image_shape[-3:-1]
    return box[:, 2] * box[:, 3] <= max_region * height * width + 1e-6  # max_region = pixels / area


def screen(module, variables, images: np.ndarray, auxiliary: np.ndarray, filter_images: np.ndarray,
           key, config: CETFConfig = CETFConfig()) -> Screening:
    """Run CETF on ``images`` (uint8[N, H, W, C]) in fixed-size batches (one compilation)."""
    images = np.asarray(images)
    n = images.shape[0]
    size = max(1, min(config.batch_size, n))
    dilation = round(config.dilation * max(images.shape[1:3]))
    settings = {"population_size": config.population_size, "differential_weight": config.differential_weight,
                "crossover_rate": config.crossover_rate, "max_generations": config.max_generations,
                "patience": config.patience, "cam_threshold": config.cam_threshold, "dilation": dilation,
                "flag_weight": config.flag_weight, "flips_weight": config.flips_weight}
    layer = None if config.feature_layer is None else tuple(config.feature_layer)
    auxiliary, filter_images = jnp.asarray(to_float(auxiliary)), jnp.asarray(to_float(filter_images))
    parts = []
    for start in range(0, n, size):
        chunk = images[start:start + size]
        pad = size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        outputs = _screen_batch(module, variables, jnp.asarray(to_float(chunk)), auxiliary, filter_images,
                                jax.random.fold_in(key, start), layer, **settings)
        predicted, priors, found, switched = jax.device_get(outputs)
        keep = slice(0, size - pad)
        parts.append((predicted[keep], priors[keep], found.box[keep], found.fitness[keep],
                      found.history[keep], found.generations[keep], switched[keep]))
    predicted, priors, box, best, history, generations, switched = (np.concatenate(p) for p in zip(*parts))
    poisoned = (best >= 0) & (switched > config.filter_threshold) & within_limit(box, config.max_region, images.shape)
    return Screening(poisoned, predicted.astype(np.int32), box.astype(np.int32), best, switched,
                     priors.astype(np.int32), history, generations.astype(np.int32))


@register("cetf", CETFConfig, kind="input filter",
          paper="Zhou et al. (evolutionary trigger detection, IEEE)",
          detector=True, summary="CAM-focus evolutionary trigger filter (rejects inputs)")
def cetf(module, variables, clean: Dataset, key, config: CETFConfig = CETFConfig()) -> DefenseResult:
    """CETF as an input filter: the classifier rejects every input it finds a trigger in.

    The auxiliary (h) and paste-and-filter images are drawn from ``clean``. Nothing is screened
    at defense time (the defender has no poisoned inputs); each classifier call screens its
    inputs and appends the regions and fitness histories of its first ``sample_size`` inputs
    to ``info["screened"]``. With ``calibration_size`` > 0 the region limit is set first
    (``calibrate_max_region``; ``info["calibration"]``).
    """
    aux_key, run_key = jax.random.split(key)
    config, calibration = calibrate_max_region(module, variables, clean, key, config)
    auxiliary, filter_images = auxiliary_split(clean, aux_key, config)
    info: dict = {"screened": [], "num_auxiliary": len(auxiliary), "num_filter": len(filter_images)}
    if calibration:
        info["calibration"] = calibration

    def classify(images):
        found = screen(module, variables, images, auxiliary, filter_images,
                       jax.random.fold_in(run_key, len(info["screened"])), config)
        info["screened"].append(found.sample(config.sample_size))
        return predict(module, variables, images), found.poisoned

    return DefenseResult(variables, classifier=classify, info=info)
