"""Lightweight repairs with CETF's extracted triggers (Zhou et al., sec. III-F and IV-A5).

The repair set is the defender's clean images (k per class, default 2) with an extracted
trigger pasted on each, labelled with their TRUE classes. Three repairs:

- ``bn_cleaning``: no gradients; a train-mode forward pass of the triggered images updates
  only the BatchNorm running statistics, μ ← (1−λ)μ + λμ_batch and σ² likewise (eqs. 5-6);
- ``bn_unlearning``: fine-tune only BatchNorm γ and β (cross-entropy, true labels);
- ``naive_unlearning``: fine-tune every parameter (Neural Cleanse-style unlearning).

Where the triggers come from: CETF screens *incoming* inputs in the paper; the defender holds
no poisoned inputs. The registered defenses therefore screen the inputs the caller passes as
``suspect_images`` (an array, or ``suspect_file``: a .npy/.npz of uint8[N, H, W, C], e.g. a batch
of deployment inputs); without them they raise. Each poisoned input yields one trigger.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import surgery
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.cetf import CETFConfig, Trigger, auxiliary_split, calibrate_max_region, screen
from bdjax.training import TrainConfig, train


# --------------------------------------------------------------------------- repair data
def triggered_repair_set(clean: Dataset, triggers: list[Trigger], per_class: int = 2, key=None) -> Dataset:
    """Up to ``per_class`` clean images of each class with a trigger pasted on, TRUE labels kept.

    Triggers are assigned round-robin, so several extracted triggers share the repair set.
    """
    if not triggers:
        raise ValueError("no triggers to repair with (CETF flagged none of the suspect inputs)")
    rng = np.random.default_rng(None if key is None else np.asarray(jax.random.key_data(key)).ravel())
    chosen = []
    for label in np.unique(clean.labels):
        members = np.flatnonzero(clean.labels == label)
        chosen.extend(rng.permutation(members)[:per_class])
    chosen = np.sort(np.asarray(chosen))
    images = clean.images[chosen].copy()
    for i in range(len(chosen)):
        images[i:i + 1] = triggers[i % len(triggers)].paste(images[i:i + 1])
    return Dataset(images, clean.labels[chosen], clean.info)


# --------------------------------------------------------------------------- BN-cleaning
def mix_batch_stats(batch_stats, moments, momentum: float):
    """(1 − λ)·old + λ·batch for every running mean and variance (eqs. 5-6); pure pytree map."""
    return jax.tree_util.tree_map(lambda old, new: (1.0 - momentum) * old + momentum * new,
                                  batch_stats, moments)


@functools.partial(jax.jit, static_argnums=0)
def _bn_cleaning(module, variables, images, momentum):
    moments = surgery.batch_moments(module, variables, images)
    return {**variables, "batch_stats": mix_batch_stats(variables["batch_stats"], moments, momentum)}


def bn_cleaning(module, variables, images, momentum: float = 0.1) -> dict:
    """One BN-cleaning update with ``images`` (uint8 or f32[N, H, W, C]) as the batch.

    Returns new variables whose ``batch_stats`` are (1 − λ)·old + λ·(train-mode batch moments);
    ``params`` are untouched and no gradient is computed. λ = ``momentum``.
    """
    surgery.require_batch_norm(variables, "BN-cleaning")
    images = np.asarray(images)
    images = to_float(images) if images.dtype == np.uint8 else images
    return _bn_cleaning(module, variables, jnp.asarray(images), jnp.float32(momentum))


# --------------------------------------------------------------------------- unlearning
def _unlearn(module, variables, dataset: Dataset, key, trainable: str, epochs: int, batch_size: int,
             learning_rate: float) -> tuple[dict, list]:
    """Fine-tune with cross-entropy in train mode (BN running stats update as in PyTorch's train()),
    SGD with momentum 0.9, no augmentation. Returns the variables and the per-epoch mean loss."""
    config = TrainConfig(epochs=epochs, batch_size=min(batch_size, len(dataset)), optimizer="sgd",
                         learning_rate=learning_rate, crop_padding=0, flip=False, trainable=trainable)
    result = train(module, dataset, config, key, variables=variables, progress=False)
    return result.variables, [h["loss"] for h in result.history]


def bn_unlearning(module, variables, dataset: Dataset, key, *, epochs: int = 3, batch_size: int = 32,
                  learning_rate: float = 0.01) -> tuple[dict, list]:
    """Fine-tune only BatchNorm γ/β on ``dataset`` (triggered images, true labels); others frozen."""
    surgery.require_batch_norm(variables, "BN-unlearning")
    return _unlearn(module, variables, dataset, key, "batch_norm", epochs, batch_size, learning_rate)


def naive_unlearning(module, variables, dataset: Dataset, key, *, epochs: int = 3, batch_size: int = 32,
                     learning_rate: float = 0.01) -> tuple[dict, list]:
    """Fine-tune all parameters on ``dataset`` (triggered images, true labels)."""
    return _unlearn(module, variables, dataset, key, "all", epochs, batch_size, learning_rate)


# --------------------------------------------------------------------------- registered defenses
@dataclasses.dataclass(frozen=True)
class RepairConfig:
    """CETF + repair. Paper: 2 clean images per class carry the trigger (IV-A5), 3 epochs
    (IV-B3, "unlearning for 3 epochs is adequate"). The paper gives neither the optimiser nor λ:
    we use SGD lr 0.01 momentum 0.9 (the FT baseline's optimiser) and λ = 0.1 (PyTorch's BN
    momentum, the framework the paper used), batches of ``batch_size``.
    ``suspect_images`` / ``suspect_file``: inputs CETF screens for triggers (see module doc);
    ``cetf``: its settings.
    """

    per_class: int = 2
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.1
    suspect_images: np.ndarray | None = None
    suspect_file: str | None = None
    cetf: CETFConfig = dataclasses.field(default_factory=CETFConfig)

    def __post_init__(self):
        if self.suspect_file and not Path(self.suspect_file).is_file():  # fail before any work
            raise FileNotFoundError(f"suspect_file {self.suspect_file} does not exist")


def _suspects(config: RepairConfig) -> np.ndarray:
    if config.suspect_images is not None:
        return np.asarray(config.suspect_images)
    if config.suspect_file:
        path = Path(config.suspect_file)
        try:
            with open(path, "rb") as f:
                loaded = np.load(f, allow_pickle=False)
                suspects = np.asarray(loaded[loaded.files[0]] if hasattr(loaded, "files") else loaded)
        except Exception as err:  # not .npy/.npz, truncated, pickled objects, an empty npz
            raise ValueError(f"suspect_file {path} is not a readable .npy/.npz of images "
                             f"({type(err).__name__}: {err})") from None
        if suspects.dtype != np.uint8 or suspects.ndim != 4:
            raise ValueError(f"suspect_file {path} must hold uint8[N, H, W, C] images, "
                             f"got {suspects.dtype}{list(suspects.shape)}")
        return suspects
    raise ValueError("CETF repairs need inputs to screen for triggers: pass suspect_images (uint8[N, H, W, C]) "
                     "or suspect_file (.npy/.npz), e.g. a batch of deployment inputs; the clean set holds none")


def extract_triggers(module, variables, clean: Dataset, key, config: RepairConfig) -> tuple[list[Trigger], dict]:
    """CETF on ``config``'s suspect inputs: (one trigger per flagged input, screening info)."""
    suspects = _suspects(config)
    aux_key, run_key = jax.random.split(key)
    cetf_config, calibration = calibrate_max_region(module, variables, clean, key, config.cetf)
    auxiliary, filter_images = auxiliary_split(clean, aux_key, cetf_config)
    found = screen(module, variables, suspects, auxiliary, filter_images, run_key, cetf_config)
    info = {"screened": len(suspects), "flagged": int(found.poisoned.sum()),
            "regions": found.sample(cetf_config.sample_size)}
    if calibration:
        info["calibration"] = calibration
    return found.triggers(suspects), info


REPAIRS = ("bn-clean", "bn-unlearn", "unlearn")


def repair_with_triggers(kind: str, module, variables, clean: Dataset, triggers: list[Trigger], data_key,
                         train_key, config: RepairConfig = RepairConfig()) -> tuple[dict, dict]:
    """Repair ``kind`` (one of ``REPAIRS``) with given triggers pasted on ``config.per_class``
    clean images per class: (new variables, info). ``data_key`` draws the repair images,
    ``train_key`` the unlearning's batches. The registered ``cetf+*`` defenses call this with
    CETF's triggers; an experiment may pass others (e.g. the true trigger's region) to
    separate the repair from the search."""
    if kind not in REPAIRS:
        raise ValueError(f"repair must be one of {REPAIRS}, got {kind!r}")
    check_clean_set(clean, f"CETF+{kind}")
    if kind != "unlearn":
        surgery.require_batch_norm(variables, f"CETF+{kind}")
    repair_set = triggered_repair_set(clean, triggers, config.per_class, data_key)
    info = {"repair_size": len(repair_set)}
    if kind == "bn-clean":
        # ceil(n / batch_size) batches of near-equal size: every image is used and no batch is a
        # remainder of a few images (one image's moments would move the running statistics as far as a
        # full batch's do, by λ).
        batches = -(-len(repair_set) // config.batch_size)
        new = variables
        for epoch in range(config.epochs):
            order = np.random.default_rng(epoch).permutation(len(repair_set))
            for chosen in np.array_split(order, batches):
                new = bn_cleaning(module, new, repair_set.images[chosen], config.momentum)
        return new, info
    repair = bn_unlearning if kind == "bn-unlearn" else naive_unlearning
    new, losses = repair(module, variables, repair_set, train_key, epochs=config.epochs,
                         batch_size=config.batch_size, learning_rate=config.learning_rate)
    return new, {**info, "losses": losses}


def _repair(kind: str, module, variables, clean: Dataset, key, config: RepairConfig) -> DefenseResult:
    check_clean_set(clean, f"CETF+{kind}")
    if kind != "unlearn":  # before the search: a model without BN fails fast
        surgery.require_batch_norm(variables, f"CETF+{kind}")
    extract_key, data_key, train_key = jax.random.split(key, 3)
    triggers, info = extract_triggers(module, variables, clean, extract_key, config)
    if not triggers:
        info["warning"] = "CETF flagged no suspect input: the model is returned unchanged"
        return DefenseResult(variables, info=info)
    new, repair_info = repair_with_triggers(kind, module, variables, clean, triggers, data_key, train_key, config)
    return DefenseResult(new, info={**info, **repair_info})


@register("cetf+bn-clean", RepairConfig, kind="BN repair",
          paper="Zhou et al. (evolutionary trigger detection, IEEE)",
          summary="CETF triggers + BN-cleaning (running stats only, no gradients)")
def cetf_bn_clean(module, variables, clean: Dataset, key, config: RepairConfig = RepairConfig()) -> DefenseResult:
    """Extract triggers with CETF from ``config``'s suspect inputs, then BN-clean with them."""
    return _repair("bn-clean", module, variables, clean, key, config)


@register("cetf+bn-unlearn", RepairConfig, kind="BN repair",
          paper="Zhou et al. (evolutionary trigger detection, IEEE)",
          summary="CETF triggers + BN-unlearning (fine-tune BN γ/β only)")
def cetf_bn_unlearn(module, variables, clean: Dataset, key, config: RepairConfig = RepairConfig()) -> DefenseResult:
    """Extract triggers with CETF from ``config``'s suspect inputs, then fine-tune BN γ/β only."""
    return _repair("bn-unlearn", module, variables, clean, key, config)


@register("cetf+unlearn", RepairConfig, kind="unlearning",
          paper="Zhou et al. (evolutionary trigger detection, IEEE)",
          summary="CETF triggers + naive unlearning (fine-tune all parameters)")
def cetf_unlearn(module, variables, clean: Dataset, key, config: RepairConfig = RepairConfig()) -> DefenseResult:
    """Extract triggers with CETF from ``config``'s suspect inputs, then fine-tune every parameter."""
    return _repair("unlearn", module, variables, clean, key, config)
