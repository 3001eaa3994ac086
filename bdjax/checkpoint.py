"""Run directories: model variables, the attack's trigger and a JSON record, written atomically.

A run directory holds

- ``variables.npz``: every leaf of ``variables`` under its '/'-joined path
  (``params/stage1_0/conv1/kernel``), and the attack's arrays under ``attack/<field>``;
- ``record.json``: dataset, model name, attack (name + static fields), target map, poison
  rate, seed, training config, metrics, optionally the input normalisation of an imported
  model (``input_normalization``), the SHA-256 of ``variables.npz`` and the SHA-256 of
  the record itself (``record_sha256``, of its canonical JSON without that field).

A save writes the whole run into a hidden sibling folder, flushes it to disk and swaps it in
with one atomic rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so a kill at any moment
leaves the old run or the new one under the real name, never a mix or nothing. Where the
exchange is not available the old run is renamed aside first; ``load`` finishes such an
interrupted swap. Loading checks both hashes, that every weight is finite and that the tree
fits the architecture, and says what is wrong when they disagree. Records written before
``record_sha256`` existed load without that check.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bdjax import attacks as attacks_lib
from bdjax import models
from bdjax.attacks.base import Attack, TargetMap
from bdjax.data.dataset import INFOS
from bdjax.trees import flat_items, npz_bytes, unflatten

FORMAT_VERSION = 1
VARIABLES_FILE = "variables.npz"
RECORD_FILE = "record.json"
# Inside a run directory while it trains: the last finished epoch's full training state.
TRAINING_DIR = "training"
TRAINING_META = "state.json"
RECORD_HASH_FIELD = "record_sha256"
# Optional record entry {"mean": [...], "std": [...]}: the model normalises its [0, 1] inputs
# with these statistics instead of the dataset's (a model imported from another framework).
INPUT_NORMALIZATION = "input_normalization"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A run directory that is missing, corrupt, or does not match the model it names."""


class StaleTrainingState(CheckpointError):
    """An unfinished training's saved state that another training (other data, recipe, seed or
    model) wrote: it cannot be resumed. ``path``: its folder."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = path


@dataclasses.dataclass
class Run:
    """Everything a defense or an evaluation needs about a trained model."""

    module: Any
    variables: dict
    record: dict
    attack: Attack | None
    target: TargetMap | None
    path: Path | None = None  # the run directory it was loaded from

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


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{key}": np.asarray(leaf) for key, leaf in flat_items(tree)}


def save(run_dir, variables: dict, record: dict, attack: Attack | None = None,
         target: TargetMap | None = None) -> Path:
    """Write ``variables`` (+ the attack's trigger arrays) and ``record`` as the run ``run_dir``.

    ``record`` must name ``dataset`` and ``model``; the attack, target and hashes are added.
    Replaces the run ``run_dir`` holds in one atomic swap (callers decide whether they may:
    ``bdjax train`` / ``defend`` refuse without ``--overwrite``); anything else in the folder
    (an unfinished training's ``training/`` state, which ``train_runs`` removes at the end, a
    user's notes) stays, hard-linked into the new folder. Raises CheckpointError for
    non-finite weights: a diverged model is never saved.
    """
    for required in ("dataset", "model"):
        if required not in record:
            raise ValueError(f"record must contain {required!r}")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} exists and is not a directory; choose another output path")
    arrays = {}
    for collection in ("params", "batch_stats"):
        if collection in variables:
            arrays.update(_flatten(variables[collection], collection))
    _check_finite(arrays, f"variables to save in {run_dir}")
    record = dict(record, format=FORMAT_VERSION)
    if attack is not None:
        meta, attack_arrays = attack.to_record()
        arrays.update({f"attack/{k}": v for k, v in attack_arrays.items()})
        record["attack"] = meta
    else:
        record.setdefault("attack", None)
    record["target"] = target.to_record() if target is not None else None
    payload = npz_bytes(arrays)
    record["variables_sha256"] = hashlib.sha256(payload).hexdigest()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".new", dir=run_dir.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a run is an ordinary folder
        atomic_write(staging / VARIABLES_FILE, payload)
        atomic_write(staging / RECORD_FILE, _record_bytes(record))
        _carry_over(run_dir, staging)
        _fsync_dir(staging)
        _swap_in(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old run after a swap, or a failed save's files
    return run_dir


def update_record(run_dir, **fields) -> dict:
    """Merge ``fields`` into the run's record (atomically); returns the new record."""
    record = read_record(run_dir)
    record.update(fields)
    atomic_write(Path(run_dir) / RECORD_FILE, _record_bytes(record))
    return read_record(run_dir)


def record_hash(record: dict) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no whitespace) without ``record_sha256``."""
    body = {k: v for k, v in _jsonable(record).items() if k != RECORD_HASH_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _record_bytes(record: dict) -> bytes:
    record = _jsonable(record)
    record[RECORD_HASH_FIELD] = record_hash(record)
    return (json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _carry_over(run_dir: Path, staging: Path):
    """Link (else copy) every entry of ``run_dir`` but the run's own two files into ``staging``."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name in (VARIABLES_FILE, RECORD_FILE):
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source, target):
    try:
        os.link(source, target)  # the old run keeps its own link until it is removed
    except OSError:
        shutil.copy2(source, target)


def _fsync_dir(path: Path):
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # e.g. a filesystem without it
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _swap_in(staging: Path, run_dir: Path):
    """Put the complete run ``staging`` at ``run_dir``; the old run, if any, ends up at ``staging``."""
    if not run_dir.exists():
        os.rename(staging, run_dir)
    elif not _exchange(staging, run_dir):
        # Two renames: a kill between them leaves the new run complete at ``staging`` (*.new),
        # which read_record moves into place.
        aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".old", dir=run_dir.parent))
        os.rename(run_dir, aside)  # onto the empty folder mkdtemp made
        try:
            os.rename(staging, run_dir)
        except BaseException:
            os.rename(aside, run_dir)
            raise
        os.rename(aside, staging)
    _fsync_dir(run_dir.parent)


def _finish_interrupted_swap(run_dir: Path) -> bool:
    """Move the complete run a killed save left beside a missing ``run_dir`` into place.

    The newest complete new run (``.NAME.*.new``) wins, and the old run it replaced is removed,
    as the save would have done; without one, the old run (``.NAME.*.old``) goes back.
    """
    if not run_dir.parent.is_dir():
        return False

    def complete(kind):
        found = [p for p in run_dir.parent.glob(f".{run_dir.name}.*.{kind}")
                 if (p / RECORD_FILE).is_file() and (p / VARIABLES_FILE).is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    new, old = complete("new"), complete("old")
    if not new and not old:
        return False
    os.rename((new or old)[0], run_dir)
    log.warning("finished an interrupted save of %s", run_dir)
    if new:
        for leftover in old:
            shutil.rmtree(leftover, ignore_errors=True)
    return True


def _check_finite(arrays: dict[str, np.ndarray], what: str):
    for key, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise CheckpointError(f"{what}: {key} holds {bad} non-finite value(s) (NaN or inf); "
                                  "the model diverged, so it is not used")


def read_record(run_dir) -> dict:
    """The run's record, its checksum verified (records older than the checksum: none to verify)."""
    path = Path(run_dir) / RECORD_FILE
    if not Path(run_dir).exists() and not _finish_interrupted_swap(Path(run_dir)):
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory (not a directory)")
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
    if RECORD_HASH_FIELD in record and record[RECORD_HASH_FIELD] != record_hash(record):
        raise CheckpointError(f"{path} was changed after it was written: its {RECORD_HASH_FIELD} does not "
                              "match its contents (a hand edit or a damaged file); restore it or retrain")
    for field in ("dataset", "model", "variables_sha256"):
        if not isinstance(record.get(field), str):
            raise CheckpointError(f"{path} has no valid {field!r} entry")
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
    _check_finite({k: v for k, v in flat.items() if not k.startswith("attack/")}, str(path))
    tree = unflatten(flat)
    variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    if record["dataset"] not in INFOS:
        raise CheckpointError(f"record names unknown dataset {record['dataset']!r}")
    info = INFOS[record["dataset"]]
    if record.get(INPUT_NORMALIZATION):
        info = _with_normalization(info, record[INPUT_NORMALIZATION], run_dir / RECORD_FILE)
    try:
        module = models.create(record["model"], info)
    except ValueError as err:
        raise CheckpointError(f"{run_dir / RECORD_FILE}: {err}") from None
    _check_structure(module, variables, record, path)
    variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
    try:
        attack = attacks_lib.from_record(record["attack"], tree.get("attack", {})) if record.get("attack") else None
        target = TargetMap.from_record(record["target"]) if record.get("target") else None
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{run_dir / RECORD_FILE}: its attack or target cannot be rebuilt ({err})") from None
    if target is not None and target.num_classes != info.num_classes:
        raise CheckpointError(f"{run_dir / RECORD_FILE}: target map has {target.num_classes} classes but "
                              f"{info.name} has {info.num_classes}")
    return Run(module, variables, record, attack, target, run_dir)


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
    payload = npz_bytes({f"{i:05d}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))})
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


def _with_normalization(info, normalization, path):
    """``info`` with the channel statistics an imported model's inputs were normalised with."""
    try:
        mean, std = (tuple(float(v) for v in normalization[k]) for k in ("mean", "std"))
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: {INPUT_NORMALIZATION} must hold 'mean' and 'std' lists") from None
    channels = info.image_shape[-1]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise CheckpointError(f"{path}: {INPUT_NORMALIZATION} needs {channels} means and {channels} "
                              f"positive stds, got {list(mean)} / {list(std)}")
    return dataclasses.replace(info, mean=mean, std=std)


def _check_structure(module, variables, record, path):
    shape = INFOS[record["dataset"]].image_shape
    expected = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), shape))
    want = {k: tuple(v.shape) for k, v in flat_items(expected)}
    got = {k: tuple(np.shape(v)) for k, v in flat_items(variables)}
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
