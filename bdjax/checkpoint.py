"""Run directories: model variables, the attack's trigger and a JSON record, written atomically.

A run directory holds

- ``variables.npz``: every leaf of ``variables`` under its '/'-joined path
  (``params/stage1_0/conv1/kernel``), and the attack's arrays under ``attack/<field>``;
- ``record.json``: dataset, model name, attack (name + static fields), target map, poison
  rate, seed, training config, metrics and the SHA-256 of ``variables.npz``.

Files are written to a temporary name in the same directory, flushed to disk and renamed, so
an interrupted save never leaves a half-written file under the real name. Loading checks the
hash and the tree against the architecture, and says what is wrong when they disagree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bdjax import attacks as attacks_lib
from bdjax import models
from bdjax.attacks.base import Attack, TargetMap
from bdjax.data.dataset import INFOS

FORMAT_VERSION = 1
VARIABLES_FILE = "variables.npz"
RECORD_FILE = "record.json"
# Inside a run directory while it trains: the last finished epoch's full training state.
TRAINING_DIR = "training"
TRAINING_META = "state.json"


class CheckpointError(ValueError):
    """A run directory that is missing, corrupt, or does not match the model it names."""


@dataclasses.dataclass
class Run:
    """Everything a defense or an evaluation needs about a trained model."""

    module: Any
    variables: dict
    record: dict
    attack: Attack | None
    target: TargetMap | None

    @property
    def dataset(self) -> str:
        return self.record["dataset"]


def atomic_write(path: Path, data: bytes):
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files readable by the owner only; give them the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _flat_items(tree):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        yield "/".join(str(getattr(k, "key", k)) for k in path), leaf


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{key}": np.asarray(leaf) for key, leaf in _flat_items(tree)}


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def save(run_dir, variables: dict, record: dict, attack: Attack | None = None,
         target: TargetMap | None = None) -> Path:
    """Write ``variables`` (+ the attack's trigger arrays) and ``record`` into ``run_dir``.

    ``record`` must name ``dataset`` and ``model``; the attack, target and file hash are added.
    """
    for required in ("dataset", "model"):
        if required not in record:
            raise ValueError(f"record must contain {required!r}")
    run_dir = Path(run_dir)
    arrays = {}
    for collection in ("params", "batch_stats"):
        if collection in variables:
            arrays.update(_flatten(variables[collection], collection))
    record = dict(record, format=FORMAT_VERSION)
    if attack is not None:
        meta, attack_arrays = attack.to_record()
        arrays.update({f"attack/{k}": v for k, v in attack_arrays.items()})
        record["attack"] = meta
    else:
        record.setdefault("attack", None)
    record["target"] = target.to_record() if target is not None else None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    record["variables_sha256"] = hashlib.sha256(payload).hexdigest()
    atomic_write(run_dir / VARIABLES_FILE, payload)
    atomic_write(run_dir / RECORD_FILE, (json.dumps(_jsonable(record), indent=2, sort_keys=True) + "\n").encode())
    return run_dir


def update_record(run_dir, **fields) -> dict:
    """Merge ``fields`` into the run's record (atomically); returns the new record."""
    record = read_record(run_dir)
    record.update(fields)
    atomic_write(Path(run_dir) / RECORD_FILE,
                  (json.dumps(_jsonable(record), indent=2, sort_keys=True) + "\n").encode())
    return record


def read_record(run_dir) -> dict:
    path = Path(run_dir) / RECORD_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.is_file() and (Path(run_dir) / TRAINING_DIR / TRAINING_META).is_file():
        raise CheckpointError(f"{run_dir} is an unfinished training run: continue it with the same "
                              "`bdjax train` command plus --resume")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a bdjax run directory")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a bdjax record of format {FORMAT_VERSION}")
    return record


def load(run_dir) -> Run:
    """Read a run directory back, checking integrity and that the tree fits the architecture."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    path = run_dir / VARIABLES_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != record.get("variables_sha256"):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match the one in {RECORD_FILE}")
    try:
        with np.load(io.BytesIO(payload)) as npz:
            flat = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile/pickle errors of many kinds
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    tree = _unflatten(flat)
    variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    if record["dataset"] not in INFOS:
        raise CheckpointError(f"record names unknown dataset {record['dataset']!r}")
    module = models.create(record["model"], INFOS[record["dataset"]])
    _check_structure(module, variables, record, path)
    variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
    attack = None
    if record.get("attack"):
        attack = attacks_lib.from_record(record["attack"], tree.get("attack", {}))
    target = TargetMap.from_record(record["target"]) if record.get("target") else None
    return Run(module, variables, record, attack, target)


# --------------------------------------------------------------------------- training state
# The per-epoch state of an unfinished training (parameters, BatchNorm statistics, optimiser
# state, data-order RNG, history). Our own format rather than orbax-checkpoint: the state is a
# few MB written once an epoch, synchronously; the same atomic write and SHA-256 check as a run
# directory catch a torn or bit-flipped file (orbax verifies no content hash), and a kill at any
# moment leaves the previous epoch's state readable: a new epoch goes to a new file and only the
# atomically replaced ``state.json`` names the current one.

def save_training_state(directory, tree, meta: dict) -> Path:
    """Write the leaves of ``tree`` and the JSON ``meta`` (which must hold ``epoch``)."""
    directory = Path(directory)
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))})
    payload = buffer.getvalue()
    name = f"state-{int(meta['epoch']):05d}.npz"
    atomic_write(directory / name, payload)
    meta = dict(meta, state_file=name, state_sha256=hashlib.sha256(payload).hexdigest())
    atomic_write(directory / TRAINING_META, (json.dumps(_jsonable(meta), indent=1) + "\n").encode())
    for old in directory.glob("state-*.npz"):
        if old.name != name:
            old.unlink()
    return directory


def load_training_state(directory, template):
    """(tree shaped like ``template``, meta) from ``save_training_state``, or None if there is none."""
    directory = Path(directory)
    meta_path = directory / TRAINING_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        path = directory / meta["state_file"]
        payload = path.read_bytes()
    except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"training state in {directory} is unreadable ({err}); "
                              "start again with --overwrite") from None
    if hashlib.sha256(payload).hexdigest() != meta.get("state_sha256"):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {meta_path}")
    with np.load(io.BytesIO(payload)) as npz:
        leaves = [npz[k] for k in sorted(npz.files)]
    want, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(want) or any(np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype
                                       for a, b in zip(leaves, want)):
        raise CheckpointError(f"training state in {directory} does not fit this model and optimiser")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), meta


def _check_structure(module, variables, record, path):
    shape = INFOS[record["dataset"]].image_shape
    expected = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), shape))
    want = {k: tuple(v.shape) for k, v in _flat_items(expected)}
    got = {k: tuple(np.shape(v)) for k, v in _flat_items(variables)}
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise CheckpointError(f"{path} does not match model {record['model']!r}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key in want:
        if want[key] != got[key]:
            raise CheckpointError(f"{path}: {key} has shape {got[key]}, model {record['model']!r} "
                                  f"expects {want[key]}")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
