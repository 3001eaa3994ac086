"""Datasets: uint8 NHWC storage, readers for the real files, clean defense sets."""

from bdjax.data.cifar import read_cifar10_jpeg, read_cifar_pickles
from bdjax.data.dataset import CIFAR10, CIFAR100, GTSRB, INFOS, Dataset, DatasetInfo, to_float, to_uint8
from bdjax.data.download import ChecksumError, DownloadError
from bdjax.data.files import DataFileError
from bdjax.data.gtsrb import read_gtsrb_folder, read_gtsrb_npz
from bdjax.data.loading import load, load_gtsrb_tracks
from bdjax.data.locations import ENV_VAR, DataNotFoundError, cache_dir, data_root
from bdjax.data.splits import (as_numpy_rng, clean_defense_split, stratified_subset, take_per_class,
                               train_val_split)
from bdjax.data.tfds import load_tfds
from bdjax.data.verify import verify_folder

__all__ = [
    "CIFAR10", "CIFAR100", "GTSRB", "INFOS", "Dataset", "DatasetInfo", "to_float", "to_uint8",
    "load", "load_gtsrb_tracks", "load_tfds",
    "read_cifar_pickles", "read_cifar10_jpeg", "read_gtsrb_folder", "read_gtsrb_npz",
    "ENV_VAR", "DataNotFoundError", "DataFileError", "DownloadError", "ChecksumError", "cache_dir", "data_root",
    "verify_folder",
    "as_numpy_rng", "clean_defense_split", "train_val_split", "take_per_class", "stratified_subset",
]
