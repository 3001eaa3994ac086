"""GTSRB readers: the compact 32x32 file and the official folder layout.

Compact file ``gtsrb/gtsrb32.npz``: ``x_train`` uint8[39209, 32, 32, 3], ``y_train``,
``track_train`` (track number within the class), ``x_test`` uint8[12630, 32, 32, 3], ``y_test``.

Official layout (what the GTSRB_Final_*.zip archives unpack to)::

    GTSRB/Final_Training/Images/000NN/*.ppm + GT-000NN.csv   (NN = class id 00..42)
    GTSRB/Final_Test/Images/*.ppm
    GT-final_test.csv   (from GTSRB_Final_Test_GT.zip; also found in GTSRB/Final_Test/)

The CSVs are semicolon-separated with columns
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``. Training file names are
``TTTTT_FFFFF.ppm``: track TTTTT, frame FFFFF. A physical track is the pair (class, track)
and holds ~30 frames of one sign, so it must not straddle a train/validation split.

File names in the CSVs must be plain names (``00000.ppm``): an entry such as ``../../x.ppm``
is refused rather than read from outside the folder. Unreadable files (a truncated npz, a
corrupt PPM, a CSV with a bad row) raise ``DataFileError`` naming the file.

Resizing: the whole image (no ROI crop) to 32x32 with Pillow bilinear. The shared
``gtsrb32.npz`` was made with OpenCV's ``cv2.resize`` (bilinear, no antialiasing), whereas
Pillow's bilinear filter widens its support when shrinking (antialiasing), so images read
from the original full-size PPMs differ from the shared file by a few grey levels, more for
large source images. PPMs that are already 32x32 are taken as they are.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bdjax.data.dataset import GTSRB, Dataset
from bdjax.data.files import DataFileError, dataset_from_file, plain_file_name, read_npz_arrays

GTSRB_NPZ_FILE = "gtsrb/gtsrb32.npz"
TRAIN_IMAGES = "GTSRB/Final_Training/Images"
TEST_IMAGES = "GTSRB/Final_Test/Images"
# Where GT-final_test.csv may sit, relative to the data folder, most usual first.
TEST_CSV_PLACES = ("GT-final_test.csv", "GTSRB/Final_Test/GT-final_test.csv",
                   "GTSRB/Final_Test/Images/GT-final_test.csv", "GTSRB/GT-final_test.csv")
IMAGE_SIZE = 32


# --- compact file -------------------------------------------------------------------

def read_gtsrb_npz(path: str | os.PathLike, split: str) -> Dataset:
    """``gtsrb32.npz`` -> Dataset (images: uint8[N, 32, 32, 3]), read once per process and split.

    The arrays are shared between calls and therefore read-only; copy before editing in place.
    """
    images, labels = _read_npz_arrays(*_file_key(path), f"x_{split}", f"y_{split}")
    return dataset_from_file(path, images, labels, GTSRB)


def read_gtsrb_npz_tracks(path: str | os.PathLike) -> np.ndarray:
    """int32[39209]: the track number within its class of each train image of ``gtsrb32.npz``."""
    (tracks,) = _read_npz_arrays(*_file_key(path), "track_train")
    return tracks


def _file_key(path) -> tuple[str, int, int]:
    # mtime and size in the cache key: a replaced file is read again, not served stale.
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _read_npz_arrays(path: str, mtime_ns: int, size: int, *keys: str) -> tuple[np.ndarray, ...]:
    del mtime_ns, size  # cache key only
    arrays = []
    for key, array in zip(keys, read_npz_arrays(path, *keys)):
        if key.startswith("x_"):
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise DataFileError(path, f"{key} must be uint8[N, 32, 32, 3], got {array.dtype}{list(array.shape)}")
        else:
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise DataFileError(path, f"{key} must be a vector of integers, got {array.dtype}{list(array.shape)}")
            array = array.astype(np.int32)
        array.setflags(write=False)
        arrays.append(array)
    return tuple(arrays)


# --- official folder layout ----------------------------------------------------------

def read_gt_csv(path: str | os.PathLike) -> list[tuple[str, int]]:
    """A GTSRB ground-truth CSV -> [(file name, class id)], sorted by file name.

    Every file name must be a plain name (it is read from the CSV's image folder)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataFileError(path, f"not a readable CSV ({err})") from None
    if rows and not {"Filename", "ClassId"} <= set(rows[0]):
        raise DataFileError(path, f"expected columns Filename and ClassId, found {list(rows[0])}")
    entries = []
    for line, row in enumerate(rows, start=2):
        name, class_id = row["Filename"], row["ClassId"]
        if name is None or class_id is None or not class_id.strip().isdigit():
            raise DataFileError(path, f"line {line}: expected a file name and an integer ClassId, got {row}")
        entries.append((plain_file_name(name, path, Path(path).parent), int(class_id)))
    return sorted(entries)


def list_train_files(root: str | os.PathLike) -> list[tuple[Path, int, int]]:
    """[(ppm path, class id, track)] of ``root/GTSRB/Final_Training/Images``, by class then file name."""
    images_dir = Path(root) / TRAIN_IMAGES
    class_dirs = sorted(d for d in images_dir.glob("000[0-9][0-9]") if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"no class folders 000NN/ under {images_dir}")
    index = []
    for class_dir in class_dirs:
        class_id = int(class_dir.name)
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"missing {csv_path} (the official per-class ground truth)")
        for filename, label in read_gt_csv(csv_path):
            if label != class_id:
                raise DataFileError(csv_path, f"{filename} has ClassId {label}, expected {class_id}")
            track = filename.split("_")[0]
            if not track.isdigit():
                raise DataFileError(csv_path, f"{filename} is not named TTTTT_FFFFF.ppm (track_frame)")
            index.append((class_dir / filename, class_id, int(track)))
    return index


def find_test_csv(root: str | os.PathLike) -> Path | None:
    """The official ``GT-final_test.csv`` under ``root`` (see TEST_CSV_PLACES), or None."""
    for place in TEST_CSV_PLACES:
        if (Path(root) / place).is_file():
            return Path(root) / place
    return None


def list_test_files(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """[(ppm path, class id)] of ``root/GTSRB/Final_Test/Images``, in file-name order."""
    csv_path = find_test_csv(root)
    if csv_path is None:
        raise FileNotFoundError(f"GT-final_test.csv (test labels, from GTSRB_Final_Test_GT.zip) "
                                f"not found at any of {[str(Path(root) / p) for p in TEST_CSV_PLACES]}")
    return [(Path(root) / TEST_IMAGES / filename, label) for filename, label in read_gt_csv(csv_path)]


def read_image(path: str | os.PathLike, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image file -> uint8[size, size, 3], the whole image resized with Pillow bilinear."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DataFileError(path, f"not a readable image ({type(err).__name__}: {err})") from None


def read_gtsrb_folder(root: str | os.PathLike, split: str, size: int = IMAGE_SIZE) -> Dataset:
    """The official layout under ``root`` -> Dataset, images: uint8[N, size, size, 3].

    Train is ordered by class then file name (track, frame), test by file name: the order
    of ``gtsrb32.npz``.
    """
    if split == "train":
        files = [(path, label) for path, label, _ in list_train_files(root)]
    elif split == "test":
        files = list_test_files(root)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = np.empty((len(files), size, size, 3), np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = read_image(path, size)
    labels = np.array([label for _, label in files], np.int32)
    return dataset_from_file(Path(root) / (TRAIN_IMAGES if split == "train" else TEST_IMAGES), images, labels,
                             GTSRB if size == IMAGE_SIZE else dataclasses.replace(GTSRB, image_shape=(size, size, 3)))


def read_gtsrb_folder_tracks(root: str | os.PathLike) -> np.ndarray:
    """int32[N]: the track within its class of each train image, aligned with read_gtsrb_folder."""
    return np.array([track for _, _, track in list_train_files(root)], np.int32)
