"""The contract every defense follows, and the registry the CLI and sweeps use.

A defense is a pure function

    defend(module, variables, clean: Dataset, key, config) -> DefenseResult

that sees only the model and the defender's small clean set (never the training set or the
test set). It returns repaired variables and/or a test-time ``classifier`` (for input
filters and detectors), plus what it found in ``info`` (scores, masks, triggers, timings).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bdjax import typecheck
from bdjax.data.dataset import Dataset
from bdjax.evaluation import Classifier


@dataclasses.dataclass
class DefenseResult:
    variables: dict
    # Test-time rule for filters/detectors; None means "the model with ``variables``".
    classifier: Classifier | None = None
    info: dict = dataclasses.field(default_factory=dict)


DefenseFn = Callable[[Any, dict, Dataset, Any, Any], DefenseResult]


# What a defense does to the model, for ``bdjax methods``: "input filter" and "detector" are the
# ``detector`` defenses (a test-time rule that rejects inputs); the others return new variables.
KINDS = ("fine-tuning", "pruning", "unlearning", "BN repair", "input filter", "detector")


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    name: str
    fn: DefenseFn
    config_cls: type
    detector: bool = False  # reports TPR/FPR of its rejections
    summary: str = ""
    kind: str = ""  # one of KINDS
    paper: str = ""  # authors, venue and year of the method's paper


DEFENSES: dict[str, DefenseSpec] = {}


def register(name: str, config_cls: type, *, kind: str, paper: str, detector: bool = False, summary: str = ""):
    """Decorator: make ``fn`` available as ``bdjax defend NAME``.

    The registered function (``DEFENSES[name].fn``, what the CLI and sweeps call) first checks
    its inputs at this public boundary (``check_defense_inputs``)."""
    def wrap(fn: DefenseFn) -> DefenseFn:
        if name in DEFENSES:
            raise ValueError(f"defense {name!r} registered twice")
        if kind not in KINDS or detector != (kind in ("input filter", "detector")):
            raise ValueError(f"defense {name!r}: kind {kind!r} must be one of {KINDS}, "
                             "'input filter' or 'detector' exactly when detector=True")

        @functools.wraps(fn)
        def checked(module, variables, clean, key, config):
            check_defense_inputs(name, module, variables, clean, config, config_cls)
            return fn(module, variables, clean, key, config)

        DEFENSES[name] = DefenseSpec(name, checked, config_cls, detector,
                                     summary or (fn.__doc__ or "").split("\n")[0], kind, paper)
        return fn
    return wrap


def check_defense_inputs(method: str, module, variables, clean, config, config_cls: type):
    """Raise, naming the argument, unless ``clean`` is a Dataset of the images and classes the
    model takes, ``variables`` a variables dict and ``config`` a ``config_cls``.

    A clean set of another dataset (other size, channels or class count) would otherwise give
    silently wrong repairs. An empty or missing clean set is left to the defense's own message.
    """
    if clean is not None and not isinstance(clean, Dataset):
        raise TypeError(f"{method}: clean must be a bdjax.data.Dataset (uint8 images and labels), "
                        f"got {type(clean).__name__}")
    if clean is not None:
        expected = getattr(module, "image_shape", None)
        if expected is not None and tuple(clean.images.shape[1:]) != tuple(expected):
            raise ValueError(f"{method}: clean images are {'x'.join(map(str, clean.images.shape[1:]))} "
                             f"(H x W x C) but the model takes {'x'.join(map(str, expected))}")
        classes = getattr(module, "num_classes", None)
        if classes is not None and clean.info.num_classes != classes:
            raise ValueError(f"{method}: clean is a {clean.info.name} set of {clean.info.num_classes} classes "
                             f"but the model has {classes}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(f"{method}: variables must be the model's dict with 'params' (and 'batch_stats'), "
                        f"got {type(variables).__name__}")
    if not isinstance(config, config_cls):
        raise TypeError(f"{method}: config must be a {config_cls.__name__} (see defenses.make_config), "
                        f"got {type(config).__name__}")


# Vectorised sweeps (``bdjax.sweep``): a batched implementation runs N settings of one
# defense as one vmapped program,
#     fn(module, variables, clean, key, config, values, mesh) -> variables stacked [N, ...]
# where ``values`` maps each swept config field to an array [N] and the axis "seed" means
# "use jax.random.fold_in(key, seed)", exactly as the sequential sweep does. N is a multiple
# of ``mesh.size`` when a mesh (``bdjax.sharding.sweep_mesh``) is given.
@dataclasses.dataclass(frozen=True)
class BatchedSpec:
    fn: Callable
    axes: frozenset
    # Measured slower than a loop of single runs on XLA:CPU, so a sweep on CPU loops unless told
    # to vmap (``experiments/results/sweep_benchmark.md``).
    slower_on_cpu: bool = False


BATCHED: dict[str, BatchedSpec] = {}


def register_batched(name: str, axes, *, slower_on_cpu: bool = False):
    """Decorator: a vmapped implementation of defense ``name`` over the value ``axes``."""
    def wrap(fn):
        BATCHED[name] = BatchedSpec(fn, frozenset(axes), slower_on_cpu)
        return fn
    return wrap


def seed_keys(key, values: dict, n: int):
    """[N] keys for a batched implementation: fold_in(key, seed) per setting, else ``key`` repeated."""
    if "seed" in values:
        return jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(values["seed"], jnp.int32))
    return jnp.stack([key] * n)


def tile(tree, n: int):
    """Stack ``n`` copies of every leaf on a new leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def get(name: str) -> DefenseSpec:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def check_clean_set(clean: Dataset, method: str, min_size: int = 1):
    """Clear error for an empty (or too small) defense set."""
    if clean is None or len(clean) < min_size:
        size = 0 if clean is None else len(clean)
        raise ValueError(f"{method} needs a clean defense set of at least {min_size} images, got {size}")


def _nested_default(field: dataclasses.Field):
    """The field's default when it is itself a config dataclass (e.g. FP's ``finetune``), else None."""
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def config_fields(config_cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(name, type, default) of every field a ``--set`` can override, in declaration order; the
    fields of a nested config (FP's ``finetune``) as ``finetune.epochs``. A field without a
    default has ``dataclasses.MISSING``."""
    hints = typecheck.field_types(config_cls)
    rows = []
    for field in dataclasses.fields(config_cls):
        nested = _nested_default(field)
        if nested is not None:
            rows.extend(config_fields(type(nested), f"{prefix}{field.name}."))
            continue
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        kind = typecheck.describe(hints[field.name]) if field.name in hints else "any"
        rows.append((prefix + field.name, kind.replace("a number (float)", "float"), default))
    return rows


def make_config(config_cls: type, overrides: dict):
    """``config_cls(**overrides)`` with a clear error for unknown fields and for values of the
    wrong type, naming the field (CLI ``--set``; ``bdjax.typecheck``).

    A dict given for a field whose default is a config dataclass overrides only the named fields
    of that default (``{"finetune": {"epochs": 5}}``), recursively."""
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides for {config_cls.__name__} must be a dict of field values, "
                        f"got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}; "
                         f"fields: {', '.join(fields)}")
    hints = typecheck.field_types(config_cls)
    values = {}
    for name, value in overrides.items():
        nested = _nested_default(fields[name])
        if nested is not None and isinstance(value, dict):
            checked = make_config(type(nested), value)  # unknown names fail; deeper dicts convert
            value = dataclasses.replace(nested, **{k: getattr(checked, k) for k in value})
        elif name in hints:
            value = typecheck.check_value(f"{config_cls.__name__}.{name}", value, hints[name])
        values[name] = value
    return config_cls(**values)
