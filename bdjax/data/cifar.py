"""CIFAR-10/100 readers: the upstream python-pickle folders and the compact JPEG file.

Upstream layout (what ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpack to)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    cifar-100-python/train, test

Each pickle holds ``data``: uint8[N, 3072], a row being the 1024 R, then 1024 G, then
1024 B values of a 32x32 image in row-major order, and ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100).

Compact file ``cifar10/cifar10_jpeg75.npz``: every image as a quality-75 JPEG (lossy),
``jpeg_<split>`` the files back to back, ``offsets_<split>``: int64[N + 1] their
boundaries, ``y_<split>``: uint8[N].

The pickles are read by an unpickler that builds dicts, lists, strings and numpy arrays only
and refuses every other global, so a crafted file in the data folder cannot run code (plain
``pickle.load`` would call whatever the file names). ``bdjax data verify`` checks the files
against the published checksums. A file that cannot be read raises ``DataFileError`` naming it.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bdjax.data.dataset import CIFAR10, CIFAR100, Dataset
from bdjax.data.files import DataFileError, dataset_from_file, load_pickle, read_npz_arrays

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_JPEG_FILE = "cifar10/cifar10_jpeg75.npz"

PICKLE_FILES = {
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "cifar100": {"train": ("train",), "test": ("test",)},
}
_INFOS = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_SIDE = 32


def rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """uint8[N, 3072] planar rows (R plane, G plane, B plane) -> uint8[N, 32, 32, 3]."""
    return rows.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)


def nhwc_to_rows(images: np.ndarray) -> np.ndarray:
    """uint8[N, 32, 32, 3] -> uint8[N, 3072] in the upstream planar order (inverse of rows_to_nhwc)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def read_cifar_pickle_file(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One upstream pickle -> (images: uint8[N, 32, 32, 3], labels: int64[N])."""
    batch = load_pickle(path)  # the files were pickled by Python 2
    if not isinstance(batch, dict):
        raise DataFileError(path, f"expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataFileError(path, f"expected keys 'data' and {label_key!r}, found {sorted(map(str, batch))}")
    rows = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * _SIDE * _SIDE:
        raise DataFileError(path, f"'data' must be uint8[N, 3072], got {rows.dtype}{list(rows.shape)}")
    if labels.shape != (rows.shape[0],) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataFileError(path, f"{rows.shape[0]} images but {label_key} of shape {labels.shape} "
                                  f"and type {labels.dtype}")
    return rows_to_nhwc(rows), labels.astype(np.int64)


def read_cifar_pickles(folder: str | os.PathLike, name: str, split: str) -> Dataset:
    """An upstream pickle folder (``cifar-10-batches-py/`` or ``cifar-100-python/``) -> Dataset.

    name: "cifar10" | "cifar100"; split: "train" | "test". images: uint8[N, 32, 32, 3].
    """
    folder = Path(folder)
    paths = [folder / file for file in PICKLE_FILES[name][split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name} {split}: missing upstream pickle file(s): {', '.join(missing)}")
    parts = [read_cifar_pickle_file(path, _LABEL_KEYS[name]) for path in paths]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return dataset_from_file(folder, images, labels, _INFOS[name])


def decode_jpegs(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Back-to-back JPEG files -> uint8[N, H, W, 3].

    data: uint8[B] the files concatenated; offsets: int[N + 1], image i is data[offsets[i]:offsets[i+1]].
    """
    count = len(offsets) - 1
    buffer = np.asarray(data).tobytes()
    images = None
    for i in range(count):
        # Naming the format skips Pillow's format sniffing, a quarter of the time per image.
        try:
            with Image.open(io.BytesIO(buffer[offsets[i]:offsets[i + 1]]), formats=("JPEG",)) as image:
                image = image if image.mode == "RGB" else image.convert("RGB")
                pixels = np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3)
        except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
            raise ValueError(f"JPEG {i} cannot be decoded ({type(err).__name__}: {err})") from None
        if images is None:
            images = np.empty((count, *pixels.shape), np.uint8)
        if pixels.shape != images.shape[1:]:
            raise ValueError(f"JPEG {i} decodes to shape {pixels.shape}, expected {images.shape[1:]}")
        images[i] = pixels
    return images if images is not None else np.zeros((0, _SIDE, _SIDE, 3), np.uint8)


def read_cifar10_jpeg(path: str | os.PathLike, split: str) -> Dataset:
    """The compact ``cifar10_jpeg75.npz`` -> Dataset, decoded once per process and split.

    The arrays are shared between calls and therefore read-only; copy before editing in place.
    """
    path = Path(path).resolve()
    stat = path.stat()
    # mtime and size in the key: a replaced file is decoded again, not served stale.
    images, labels = _decode_cifar10_jpeg(str(path), stat.st_mtime_ns, stat.st_size, split)
    return dataset_from_file(path, images, labels, CIFAR10)


@functools.lru_cache(maxsize=4)
def _decode_cifar10_jpeg(path: str, mtime_ns: int, size: int, split: str):
    del mtime_ns, size  # cache key only
    data, offsets, labels = read_npz_arrays(path, f"jpeg_{split}", f"offsets_{split}", f"y_{split}")
    if (data.dtype != np.uint8 or data.ndim != 1 or labels.ndim != 1
            or not np.issubdtype(offsets.dtype, np.integer) or not np.issubdtype(labels.dtype, np.integer)):
        raise DataFileError(path, f"jpeg_{split} must be uint8[B], offsets_{split} and y_{split} integer "
                                  f"vectors; found {data.dtype}{list(data.shape)}, {offsets.dtype}, "
                                  f"{labels.dtype}{list(labels.shape)}")
    if (offsets.shape != (labels.shape[0] + 1,) or offsets[0] != 0 or offsets[-1] != data.size
            or (np.diff(offsets) <= 0).any()):
        raise DataFileError(path, f"offsets_{split} {offsets.shape} do not split jpeg_{split} "
                                  f"({data.size} bytes) into the {labels.shape[0]} images of y_{split}")
    try:
        images = decode_jpegs(data, offsets)
    except ValueError as err:
        raise DataFileError(path, f"{split} split: {err}") from None
    if images.shape[1:] != (_SIDE, _SIDE, 3):
        raise DataFileError(path, f"{split} images decode to {images.shape[1:]}, expected (32, 32, 3)")
    images.setflags(write=False)
    labels = labels.astype(np.int32)
    labels.setflags(write=False)
    return images, labels

