"""Reading data files without trusting them: no code runs, no path escapes, bad files are named.

- ``.npz`` files are read with ``allow_pickle=False`` (``read_npz_arrays``).
- Pickles (the upstream CIFAR batches) go through ``ArraysOnlyUnpickler``, which builds
  containers, strings, numbers and numpy arrays and refuses every other global: plain
  ``pickle.load`` calls any function a file names, ``os.system`` included.
- File names read from a file (GTSRB's CSVs) must be plain names inside their folder
  (``plain_file_name``): ``../../x.ppm`` is refused.
- A file that is there but unreadable (truncated, bit-flipped, another format) raises
  ``DataFileError``, which names it and points to ``bdjax data verify``.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from bdjax.data.dataset import Dataset, DatasetInfo


class DataFileError(ValueError):
    """A dataset file is there but is not what it should be; the message names it."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}. Check the data folder against its checksums with "
                         "`bdjax data verify` and replace the files that fail")
        self.path = path


def read_npz_arrays(path: str | os.PathLike, *keys: str) -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of an ``.npz`` file, never unpickled.

    DataFileError when the file is truncated or corrupt, not an npz, holds pickled objects or
    lacks a key; FileNotFoundError / PermissionError pass through.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataFileError(path, f"missing arrays {missing} (has {sorted(npz.files)})")
            return tuple(npz[k] for k in keys)
    except (DataFileError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataFileError(path, "holds pickled Python objects, which bdjax never loads") from None
        raise DataFileError(path, f"not a readable .npz file ({err})") from None
    except Exception as err:  # BadZipFile, EOFError, zlib.error, bad CRC, ...: truncated or bit-flipped
        raise DataFileError(path, f"truncated or corrupt ({type(err).__name__}: {err})") from None


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    """How pickles of protocol < 3 written by Python 3 store bytes (``_codecs.encode(text, "latin1")``)."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1", errors)


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and numpy arrays; refuses every other global.

    The only callables a file can reach rebuild numpy arrays, dtypes and scalars (and bytes,
    as Python 3 pickles them at protocol 2).
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays, containers "
                                     "and strings are unpickled")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def load_pickle(path: str | os.PathLike):
    """The object pickled in ``path``, through ``ArraysOnlyUnpickler`` (Python 2 strings as latin1)."""
    try:
        with open(path, "rb") as f:
            # latin1 maps Python 2 byte strings 1:1 (numpy's advice for the CIFAR batches).
            return ArraysOnlyUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as err:  # truncated (EOFError), garbage (UnpicklingError), refused globals, ...
        raise DataFileError(path, f"not a readable pickle of arrays ({type(err).__name__}: {err})") from None


def plain_file_name(name: str, listed_in, folder) -> str:
    """``name`` if it is a plain file name (no folder part, not '.' or '..'), else DataFileError
    naming ``listed_in``: a name read from a file must not reach outside ``folder``."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or os.path.basename(name) != name):
        raise DataFileError(listed_in, f"entry {name!r} is not a plain file name inside {folder}; refusing it")
    return name


def dataset_from_file(path, images, labels, info: DatasetInfo) -> Dataset:
    """``Dataset(images, labels, info)``, its complaints (labels out of range, ...) naming ``path``."""
    try:
        return Dataset(images, labels, info)
    except (TypeError, ValueError) as err:
        raise DataFileError(path, str(err)) from None
