"""LF, the low-frequency attack (Zeng et al., "Rethinking the backdoor attacks' triggers: a
frequency perspective", ICCV 2021, sec. 5): x' = clip(x + δ) with δ a smooth universal
adversarial perturbation found on a clean model.

BackdoorBench runs LF with precomputed triggers per dataset; bdjax computes its own:

1. find δ on a clean model: ``find_lf_perturbation(module, variables, clean_set, target, key)``,
   or from the shell on a trained clean run (e.g. ``experiments/zoo/resnet20-gtsrb-clean``)::

       python -m bdjax.attacks.lf_trigger --run experiments/zoo/resnet20-gtsrb-clean --target 14 --out lf-gtsrb-14.npy

   which writes f32[H, W, C] to the .npy file;
2. plant it like any other attack: ``bdjax train --attack lf --attack-arg perturbation_file=lf-gtsrb-14.npy
   --target 14`` (or ``LF.create(key, shape, perturbation=δ)``). The run saves δ itself, so the file
   is not needed afterwards.

The authors' search (their release, Sec5_Smooth_Trigger) and where bdjax deviates:

- Authors: the universal-perturbation algorithm of Moosavi-Dezfooli et al. with a *targeted
  DeepFool* step per image; after each step δ ← lowpass(δ + lowpass(Δ)), then δ is min-max
  rescaled to [0, 0.2]; passes over 100 training images until 20% of them are fooled
  (delta = 0.8), keeping the best δ; the target may switch to the "dominant" label.
  bdjax: a batched projected-gradient search (the gradient of the target-class cross-entropy
  over a batch of clean non-target images, scaled to max |·| = 1, a step of ``step_size``),
  after each step projected by the same low-pass filter and rescaled to max |δ| = ``epsilon``
  (a rescaling, as the authors', keeps δ in the band; a clip would add sharp edges); it
  stops once ``stop_success`` of the batch goes to the target and returns the δ with the best
  targeted success seen. The target is the one given, never switched.
- Low-pass filter: the authors' ``gauss_smooth``: a separable Gaussian of std 6 px, 30 taps,
  zero padding (``LFSearchConfig.sigma`` / ``kernel_size``), kept as is.
- Strength: the authors' δ spans [0, 0.2] (peak to peak 0.2, always positive, so it also
  brightens the image). bdjax's δ has max |δ| = 0.1: at most the same range 0.2, centred.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from bdjax.attacks.additive import add_perturbation
from bdjax.attacks.base import Attack, TargetMap, register
from bdjax.data.dataset import Dataset, to_float


@dataclasses.dataclass(frozen=True)
class LFSearchConfig:
    """The low-frequency universal perturbation search (see the module docstring for the paper).

    epsilon: max |δ| in [0, 1] pixel units (0.1: the authors' peak-to-peak 0.2).
    sigma, kernel_size: the Gaussian low-pass filter (authors: std 6 px, 30 taps).
    step_size: L∞ size of each raw gradient step before the filter (bdjax's choice: ε / 4).
    steps: at most this many steps (bdjax's choice; the authors loop until ``stop_success``).
    stop_success: stop once this fraction of a batch is classified as the target (authors: 0.2).
    batch_size: clean images per step (the authors pass over 100 images one at a time).
    """

    epsilon: float = 0.1
    sigma: float = 6.0
    kernel_size: int = 30
    step_size: float = 0.025
    steps: int = 100
    stop_success: float = 0.2
    batch_size: int = 256

    def __post_init__(self):
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon is in [0, 1] pixel units (0.1 by default), got {self.epsilon}")
        if not self.sigma > 0 or self.kernel_size < 1:
            raise ValueError(f"the low-pass filter needs sigma > 0 and kernel_size >= 1, got "
                             f"{self.sigma}, {self.kernel_size}")
        if not self.step_size > 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("step_size must be > 0, steps and batch_size >= 1")
        if not 0.0 < self.stop_success <= 1.0:
            raise ValueError(f"stop_success must be in (0, 1], got {self.stop_success}")


def gaussian_taps(sigma: float, kernel_size: int) -> np.ndarray:
    """f32[kernel_size]: a normalised Gaussian of std ``sigma`` px centred on the kernel."""
    offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _filter_matrix(size: int, taps: np.ndarray) -> np.ndarray:
    """f32[size, size] A with (A @ x) = the 'same'-size correlation of x with ``taps``, zero padding.

    Padding as the authors' (``kernel_size // 2`` after, one less before for an even kernel).
    """
    before = len(taps) // 2 - (1 - len(taps) % 2)
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None] + before
    inside = (offsets >= 0) & (offsets < len(taps))
    return np.where(inside, taps[np.clip(offsets, 0, len(taps) - 1)], 0.0).astype(np.float32)


def low_pass(perturbation, sigma: float = 6.0, kernel_size: int = 30):
    """The separable Gaussian low-pass filter. perturbation: f32[H, W, C] -> f32[H, W, C]."""
    height, width = perturbation.shape[:2]
    taps = gaussian_taps(sigma, kernel_size)
    rows = jnp.asarray(_filter_matrix(height, taps))
    cols = jnp.asarray(_filter_matrix(width, taps))
    return jnp.einsum("ij,jwc,kw->ikc", rows, perturbation, cols)


def project(perturbation, config: LFSearchConfig):
    """Low-pass filter, then scale to max |δ| = epsilon.

    A scaling keeps δ in the filter's band (a clip would add sharp edges). To exactly epsilon,
    not at most, as the authors rescale δ to its full range after every step: the filter
    shrinks δ each time it is applied, and the trigger's strength should not depend on how
    many steps the search took."""
    smooth = low_pass(perturbation, config.sigma, config.kernel_size)
    return smooth * (config.epsilon / jnp.maximum(jnp.max(jnp.abs(smooth)), 1e-12))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _search_step(module, config: LFSearchConfig, variables, perturbation, images, targets):
    """One step. images: f32[B, H, W, C]; targets: int32[B]. Returns (new δ, success of δ)."""
    def loss_fn(delta):
        logits = module.apply(variables, jnp.clip(images + delta[None], 0.0, 1.0), train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == targets)

    (_, success), grad = jax.value_and_grad(loss_fn, has_aux=True)(perturbation)
    # Filtered before it is scaled (as the authors filter each DeepFool step): the raw gradient
    # is mostly high-frequency, and a step of max |Δ| = step_size would all but vanish in the filter.
    step = low_pass(grad, config.sigma, config.kernel_size)
    step = step / jnp.maximum(jnp.max(jnp.abs(step)), 1e-12)
    return project(perturbation - config.step_size * step, config), success


@dataclasses.dataclass
class LFSearchResult:
    perturbation: np.ndarray  # f32[H, W, C], the best δ found
    success: float  # its targeted success rate on the batch it was measured on
    history: list[float]  # targeted success rate of δ at every step


def find_lf_perturbation(module, variables, clean_set: Dataset, target: TargetMap, key,
                         config: LFSearchConfig = LFSearchConfig()) -> LFSearchResult:
    """Search a low-frequency universal perturbation that sends ``clean_set`` to the target.

    module, variables: a clean model (models take f32 [0, 1] images). clean_set: clean images
    the attacker holds; only those whose label the target map changes are used. Each step
    draws ``config.batch_size`` of them (all of them when there are fewer).
    """
    if not isinstance(clean_set, Dataset):
        raise TypeError(f"clean_set must be a bdjax.data.Dataset, got {type(clean_set).__name__}")
    if not isinstance(target, TargetMap):
        raise TypeError(f"target must be a TargetMap, got {type(target).__name__}")
    target.check_dataset(clean_set)
    usable = np.flatnonzero(target.applies_to(clean_set.labels))
    if usable.size == 0:
        raise ValueError("clean_set holds no image of a class the target map changes")
    images = to_float(clean_set.images[usable])
    targets = np.asarray(target(clean_set.labels[usable]), np.int32)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    perturbation = jnp.zeros(images.shape[1:], jnp.float32)
    best, best_success, history = perturbation, -1.0, []
    for _ in range(config.steps):
        pick = rng.choice(images.shape[0], min(config.batch_size, images.shape[0]), replace=False)
        new, success = _search_step(module, config, variables, perturbation, jnp.asarray(images[pick]),
                                    jnp.asarray(targets[pick]))
        success = float(success)
        history.append(success)
        if success >= best_success:  # of ``perturbation``, measured before this step's update
            best, best_success = perturbation, success
        if success >= config.stop_success:
            break
        perturbation = new
    return LFSearchResult(np.asarray(best), best_success, history)


@register
@struct.dataclass
class LF(Attack):
    """x' = clip(x + δ) with δ a low-frequency universal perturbation (see the module docstring).

    ``create`` needs δ: ``perturbation`` (f32[H, W, C], |δ| ≤ 1) or ``perturbation_file``, an
    .npy file of one, e.g. from ``python -m bdjax.attacks.lf_trigger``. ``source`` records the file.
    """

    perturbation: jax.Array  # f32[H, W, C]
    source: str = struct.field(pytree_node=False, default="")

    name = "lf"

    @classmethod
    def create(cls, key, image_shape=(32, 32, 3), *, perturbation_file: str | None = None,
               perturbation=None):
        if (perturbation is None) == (perturbation_file is None):
            raise ValueError(
                "lf needs its low-frequency perturbation: give perturbation_file=FILE.npy (or perturbation=) "
                "with one found on a clean model: python -m bdjax.attacks.lf_trigger --run CLEAN_RUN --target T "
                "--out FILE.npy (bdjax.attacks.lf.find_lf_perturbation)")
        source = ""
        if perturbation_file is not None:
            path = Path(perturbation_file).expanduser()
            if not path.is_file():
                raise ValueError(f"lf perturbation_file {path} does not exist; make one with "
                                 "python -m bdjax.attacks.lf_trigger --run CLEAN_RUN --target T --out FILE.npy")
            try:
                perturbation = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"lf perturbation_file {path} is not a plain .npy array ({err})") from None
            source = str(path)
        perturbation = np.asarray(perturbation)
        if not np.issubdtype(perturbation.dtype, np.floating):
            raise TypeError(f"the lf perturbation must be float pixels in [-1, 1], got {perturbation.dtype}")
        if perturbation.shape != tuple(image_shape):
            raise ValueError(f"the lf perturbation has shape {perturbation.shape} but the images are "
                             f"{tuple(image_shape)}; find one for this dataset")
        if not np.isfinite(perturbation).all() or np.abs(perturbation).max() > 1.0:
            raise ValueError("the lf perturbation must be finite with |values| <= 1 (pixel units)")
        return cls(perturbation=jnp.asarray(perturbation, jnp.float32), source=source)

    def apply(self, images, key=None):
        return add_perturbation(images, self.perturbation)
