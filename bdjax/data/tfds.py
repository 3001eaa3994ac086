"""Any TensorFlow Datasets image-classification set as a ``Dataset`` (optional extra ``bdjax[tfds]``).

TFDS pulls in TensorFlow (~1.4 GB), so it is imported only when ``load_tfds`` is called.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from bdjax.data.dataset import INFOS, Dataset, DatasetInfo

INSTALL_HINT = "pip install 'bdjax[tfds]'"


def load_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None,
              image_size: int | None = None, download: bool = False) -> Dataset:
    """TFDS dataset ``name`` (e.g. "cifar10", "svhn_cropped"), split ``split`` -> Dataset.

    images: uint8[N, H, W, C], resized to ``image_size`` x ``image_size`` (Pillow bilinear)
    only if ``image_size`` is given. ``data_dir`` is TFDS's own data folder (default
    ``~/tensorflow_datasets``); ``download`` lets TFDS fetch and prepare the data.
    For names bdjax knows (``bdjax.data.INFOS``) the known statistics are used; otherwise
    mean/std are computed from the split loaded.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(f"load_tfds needs tensorflow-datasets and tensorflow: {INSTALL_HINT}") from error
    data_dir = None if data_dir is None else str(data_dir)
    images, labels = tfds.as_numpy(tfds.load(
        name, split=split, data_dir=data_dir, batch_size=-1, as_supervised=True, download=download))
    images = np.asarray(images, np.uint8)
    if image_size is not None:
        images = resize_images(images, image_size)
    info = INFOS.get(name) or _info_from_tfds(name, tfds.builder(name, data_dir=data_dir).info, images)
    if tuple(images.shape[1:]) != tuple(info.image_shape):  # e.g. resized: the models take this size
        info = dataclasses.replace(info, image_shape=tuple(int(d) for d in images.shape[1:]))
    return Dataset(images, np.asarray(labels, np.int32), info)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8[N, H, W, C] -> uint8[N, size, size, C], each image with Pillow bilinear."""
    if images.shape[1:3] == (size, size):
        return images
    squeeze = images.shape[-1] == 1  # Pillow wants grey images as 2-D
    resized = [np.asarray(Image.fromarray(image[..., 0] if squeeze else image)
                          .resize((size, size), Image.Resampling.BILINEAR)) for image in images]
    out = np.stack(resized) if resized else np.zeros((0, size, size, images.shape[-1]), np.uint8)
    return out[..., None] if squeeze and out.ndim == 3 else out


def _info_from_tfds(name: str, tfds_info, images: np.ndarray) -> DatasetInfo:
    label = tfds_info.features["label"]
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean, std = pixels.mean(0), pixels.std(0)
    return DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        image_shape=tuple(int(d) for d in images.shape[1:]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=tuple(label.names),
    )
