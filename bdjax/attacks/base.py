"""What every attack shares: the target rule, the trigger interface and data poisoning.

An attack is a pytree (``flax.struct.dataclass``) whose arrays fully determine the
trigger, so ``attack.apply`` is a pure, jit/vmap-able function of the images; it is
saved with the model checkpoint (``to_record`` / ``from_record``) so defenses and
metrics can apply the very same trigger later.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import typecheck
from bdjax.trees import flat_items, unflatten
from bdjax.data.dataset import Dataset, check_pixel_range, to_float, to_uint8


@dataclasses.dataclass(frozen=True)
class TargetMap:
    """Which label a triggered input should receive.

    ``all_to_one``: every triggered input goes to ``target``.
    ``all_to_all``: an input of class c goes to (c + shift) mod C (shift 1 in the papers).
    ``num_classes``: C, the dataset's class count (``dataset.info.num_classes``); required,
    since a wrong C silently wraps all-to-all labels into the wrong range.
    """

    mode: str = "all_to_one"
    target: int = 0
    num_classes: int | None = None
    shift: int = 1

    def __post_init__(self):
        if self.mode not in ("all_to_one", "all_to_all"):
            raise ValueError(f"target mode must be 'all_to_one' or 'all_to_all', got {self.mode!r}")
        if self.num_classes is None:
            raise TypeError("TargetMap needs num_classes, the dataset's class count: "
                            "TargetMap(mode, target, dataset.info.num_classes)")
        for name in ("target", "num_classes", "shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"TargetMap {name} must be an int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"TargetMap num_classes must be at least 2, got {self.num_classes}")
        if self.mode == "all_to_one" and not 0 <= self.target < self.num_classes:
            raise ValueError(f"target {self.target} outside [0, {self.num_classes})")
        if self.mode == "all_to_all" and not 0 < self.shift < self.num_classes:
            raise ValueError(f"all-to-all shift must be in [1, {self.num_classes}), got {self.shift}")

    def check_dataset(self, dataset: Dataset, what: str = "target"):
        """Raise unless this map was built for ``dataset``'s class count."""
        if self.num_classes != dataset.info.num_classes:
            raise ValueError(f"{what} maps labels of {self.num_classes} classes but the dataset "
                             f"{dataset.info.name} has {dataset.info.num_classes}; build it with "
                             f"TargetMap(mode, target, dataset.info.num_classes)")

    def __call__(self, labels):
        labels = np.asarray(labels) if not isinstance(labels, jax.Array) else labels
        xp = jnp if isinstance(labels, jax.Array) else np
        if self.mode == "all_to_one":
            return xp.full_like(labels, self.target)
        return (labels + self.shift) % self.num_classes

    def applies_to(self, labels) -> np.ndarray:
        """bool mask of inputs for which the attack changes the label (ASR counts only these)."""
        labels = np.asarray(labels)
        return self(labels) != labels

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "TargetMap":
        return cls(**record)


class Attack:
    """Interface of a trigger. Subclasses are ``flax.struct.dataclass`` pytrees.

    ``apply(images, key=None)``: float32[N, H, W, C] in [0, 1] -> same shape, in [0, 1].
    ``key`` is needed only by attacks with a random component per image (``stochastic``).
    ``clean_label``: poison only target-class images and keep their labels (SIG, CL).
    """

    name: ClassVar[str] = "attack"
    stochastic: ClassVar[bool] = False
    clean_label: ClassVar[bool] = False

    def apply(self, images, key=None):  # pragma: no cover - interface
        raise NotImplementedError

    def apply_uint8(self, images: np.ndarray, key=None) -> np.ndarray:
        """Trigger stored pixels, re-quantised to uint8 as a poisoned file would be."""
        return to_uint8(np.asarray(_apply_jitted(self, jnp.asarray(to_float(images)), key)))

    def poison_training_extras(self, dataset: Dataset, poisoned: np.ndarray, key) -> Dataset | None:
        """Extra training samples some attacks add (WaNet's noise mode). Default none."""
        return None

    # --- serialisation: static fields go to JSON, array fields to the checkpoint ---
    def to_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, arrays = {"name": self.name}, {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (jax.Array, np.ndarray)):
                arrays[field.name] = np.asarray(value)
            elif isinstance(value, dict):  # a tree of arrays (a generator's variables): '/'-joined keys
                arrays.update({f"{field.name}/{key}": np.asarray(leaf) for key, leaf in flat_items(value)})
            else:
                meta[field.name] = value
        return meta, arrays


@jax.jit
def _apply_jitted(attack: Attack, images, key):
    # The attack is a pytree argument, not a closed-over constant: one compile per
    # attack type and batch shape, shared by every call (train set, test set, ...).
    return attack.apply(images, key)


def check_images(images, what: str = "images", image_shape=None):
    """Raise a clear error unless images are float[N, H, W, C] (or [H, W, C]) in [0, 1].

    ``image_shape``: (H, W, C) the trigger was built for; other sizes are rejected here
    rather than failing later with an opaque broadcasting error. Values (finite, in [0, 1])
    are checked where they are known, i.e. outside ``jit`` / ``vmap`` tracing.
    """
    if not hasattr(images, "dtype") or not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{what} must be float pixels in [0, 1]; got dtype {getattr(images, 'dtype', type(images))}"
            " (convert stored uint8 with bdjax.data.to_float)")
    if images.ndim not in (3, 4):
        raise ValueError(f"{what} must be [N, H, W, C] or [H, W, C], got shape {images.shape}")
    if image_shape is not None and tuple(images.shape[-3:]) != tuple(image_shape):
        raise ValueError(
            f"{what} are {tuple(images.shape[-3:])} per image but the trigger was built for "
            f"{tuple(image_shape)}; build the attack with image_shape={tuple(images.shape[-3:])}")
    if not isinstance(images, jax.core.Tracer):
        check_pixel_range(np.asarray(images), what)


def match_rank(array, images):
    """Prepend unit axes so ``array`` (e.g. f32[H, W, C]) has the rank of ``images``.

    Explicit, so trigger code also runs under ``jax.numpy_rank_promotion("raise")``.
    """
    return jnp.reshape(array, (1,) * (images.ndim - array.ndim) + tuple(array.shape))


def user_image(image, channels: int) -> np.ndarray:
    """A trigger image given by the user as f32[h, w, 1 or C] in [0, 1]; uint8 is scaled to [0, 1]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / np.float32(255.0)
    elif not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"pattern must be uint8 or float in [0, 1], got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, channels):
        raise ValueError(f"pattern must be [h, w, {channels}], [h, w, 1] or [h, w], got {image.shape}")
    if image.min() < 0.0 or image.max() > 1.0:
        raise ValueError("float pattern values must lie in [0, 1]")
    return image.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PoisonedSet:
    """A poisoned training set and where the poison went."""

    dataset: Dataset
    poison_indices: np.ndarray  # indices (into dataset) of triggered samples


def poison_training_set(dataset: Dataset, attack: Attack, target: TargetMap, key, *,
                        rate: float | None = None, per_class: int | None = None) -> PoisonedSet:
    """Trigger a fraction ``rate`` of the samples (or ``per_class`` from each source class).

    Dirty-label attacks relabel triggered samples with ``target(label)`` and draw them from
    classes the target map changes; clean-label attacks draw them from the target class and
    keep the label. Deterministic given ``key``.
    """
    if (rate is None) == (per_class is None):
        raise ValueError("give exactly one of rate= or per_class=")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a bdjax.data.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("cannot poison an empty dataset")
    target.check_dataset(dataset)
    labels = dataset.labels
    if attack.clean_label:
        if target.mode != "all_to_one":
            raise ValueError(f"{attack.name} is clean-label and supports all_to_one targets only")
        eligible = np.flatnonzero(labels == target.target)
    else:
        eligible = np.flatnonzero(target.applies_to(labels))
    select_key, trigger_key, extra_key = jax.random.split(key, 3)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(select_key)).ravel())
    if rate is not None:
        if not 0.0 <= rate <= 1.0:  # NaN fails too
            raise ValueError(f"poison rate must be in [0, 1], got {rate}")
        count = min(int(round(rate * len(dataset))), eligible.size)
        chosen = rng.choice(eligible, size=count, replace=False)
    else:
        chosen = np.concatenate([
            rng.choice(idx, size=min(per_class, idx.size), replace=False)
            for c in np.unique(labels[eligible])
            for idx in [eligible[labels[eligible] == c]]
        ]) if eligible.size else eligible
    chosen = np.sort(chosen).astype(np.int64)

    images, new_labels = dataset.images.copy(), labels.copy()
    if chosen.size:
        images[chosen] = attack.apply_uint8(images[chosen], trigger_key if attack.stochastic else None)
        if not attack.clean_label:
            new_labels[chosen] = target(labels[chosen])
    poisoned = Dataset(images, new_labels, dataset.info)
    extras = attack.poison_training_extras(dataset, chosen, extra_key)
    if extras is not None and len(extras):
        poisoned = Dataset(np.concatenate([poisoned.images, extras.images]),
                           np.concatenate([poisoned.labels, extras.labels]), dataset.info)
    return PoisonedSet(poisoned, chosen)


def poison_test_set(dataset: Dataset, attack: Attack, target: TargetMap, key=None) -> tuple[Dataset, np.ndarray]:
    """Triggered copies of the test images the attack applies to, for ASR and SIA.

    Returns (triggered set with TRUE labels, target labels). Images whose true class is
    already the target are excluded, so ASR measures label flips only.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a bdjax.data.Dataset, got {type(dataset).__name__}")
    target.check_dataset(dataset)
    keep = target.applies_to(dataset.labels)
    source = dataset.subset(np.flatnonzero(keep))
    if key is None and attack.stochastic:
        key = jax.random.key(0)
    triggered = Dataset(attack.apply_uint8(source.images, key), source.labels, dataset.info)
    return triggered, target(source.labels).astype(np.int32)


ATTACKS: dict[str, Any] = {}


def register(cls):
    """Class decorator: make an attack constructible by name (``bdjax.attacks.make``)."""
    ATTACKS[cls.name] = cls
    return cls


def make(name: str, key, image_shape=(32, 32, 3), **kwargs) -> Attack:
    """Build attack ``name``; random parts (pattern, location, noise) are drawn from ``key``."""
    kwargs = check_args(name, kwargs)
    return ATTACKS[name].create(key, image_shape, **kwargs)


def check_args(name: str, kwargs: dict) -> dict:
    """The keyword arguments of attack ``name`` (CLI ``--attack-arg``), checked against its
    ``create`` signature: unknown names and values of the wrong type are errors naming them.
    Returns them with lists given for tuples turned into tuples."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    parameters = dict(list(inspect.signature(ATTACKS[name].create).parameters.items())[2:])  # after key, image_shape
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(f"attack {name!r} has no argument(s) {unknown}; arguments: {', '.join(parameters)}")
    hints = typing.get_type_hints(ATTACKS[name].create)
    checked = {}
    for key, value in kwargs.items():
        default = parameters[key].default
        hint = hints.get(key, type(default) if default not in (None, inspect.Parameter.empty) else None)
        checked[key] = value if hint is None else typecheck.check_value(f"{name} argument {key}", value, hint)
    return checked


def from_record(meta: dict, arrays: dict[str, np.ndarray]) -> Attack:
    """Rebuild an attack saved with ``Attack.to_record``."""
    meta = dict(meta)
    name = meta.pop("name")
    if name not in ATTACKS:
        raise ValueError(f"checkpoint names unknown attack {name!r}; known: {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    field_names = {f.name for f in dataclasses.fields(cls)}
    arrays = unflatten(arrays)
    missing = field_names - set(meta) - set(arrays)
    if missing:
        raise ValueError(f"saved attack {name!r} lacks fields {sorted(missing)}")
    # JSON turns tuples into lists; static fields must be hashable again for jit.
    values = {k: _to_tuple(v) for k, v in meta.items() if k in field_names}
    values.update({k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in arrays.items() if k in field_names})
    return cls(**values)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
