"""The in-memory dataset type and the single place where pixels become model inputs.

Images are stored as ``uint8[N, H, W, C]`` (NHWC, RGB). Models take ``float32`` in
``[0, 1]`` and normalise internally (see ``bdjax.models``), so triggers, masks and
reverse-engineered perturbations all live in the same ``[0, 1]`` pixel space.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``mean``/``std`` are per-channel statistics of the training images in ``[0, 1]``;
    models use them for input normalisation.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] = ()
    # Horizontal flips are a label-preserving augmentation for natural images,
    # not for traffic signs (left/right turn signs swap meaning).
    flip_augment: bool = True


CIFAR10 = DatasetInfo(
    name="cifar10",
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    class_names=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
)
CIFAR100 = DatasetInfo(
    name="cifar100",
    num_classes=100,
    image_shape=(32, 32, 3),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
GTSRB = DatasetInfo(
    name="gtsrb",
    num_classes=43,
    image_shape=(32, 32, 3),
    mean=(0.3403, 0.3121, 0.3214),
    std=(0.2724, 0.2608, 0.2669),
    flip_augment=False,
)
INFOS = {info.name: info for info in (CIFAR10, CIFAR100, GTSRB)}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image set.

    images: uint8[N, H, W, C]; labels: int32[N].
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self):
        if not isinstance(self.info, DatasetInfo):
            raise TypeError(f"info must be a bdjax.data.DatasetInfo, got {type(self.info).__name__}")
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 4:
            raise ValueError(f"images must be uint8[N, H, W, C], got shape {images.shape}")
        if images.dtype != np.uint8:
            hint = (" (floats in [0, 1]: convert with bdjax.data.to_uint8)"
                    if np.issubdtype(images.dtype, np.floating) else "")
            raise TypeError(f"images must be uint8 (stored pixels), got {images.dtype}{hint}")
        if tuple(images.shape[1:]) != tuple(self.info.image_shape):
            raise ValueError(f"images are {'x'.join(map(str, images.shape[1:]))} (H x W x C) per image but "
                             f"{self.info.name} images are {'x'.join(map(str, self.info.image_shape))}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.info.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.info.num_classes}) for {self.info.name}, "
                f"got range [{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int32))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> "Dataset":
        indices = np.asarray(indices)
        return Dataset(self.images[indices], self.labels[indices], self.info)

    def replace(self, **changes) -> "Dataset":
        return dataclasses.replace(self, **changes)

    def floats(self) -> np.ndarray:
        """float32[N, H, W, C] in [0, 1]."""
        return to_float(self.images)


def to_float(images) -> np.ndarray:
    """uint8[..., C] pixels -> float32 in [0, 1]. The only uint8 -> float conversion."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0)


def to_uint8(images) -> np.ndarray:
    """float pixels in [0, 1] -> uint8, rounding to the nearest level (what saving an image does)."""
    images = np.asarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise ValueError("to_uint8: images hold NaN or infinite values")
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def check_pixel_range(images: np.ndarray, what: str = "images"):
    """Raise unless the float pixels ``images`` are finite and in [0, 1], naming ``what``."""
    if images.size == 0:
        return
    if not np.isfinite(images).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        hint = (" (pixels on the 0..255 scale? divide by 255, or pass uint8 through bdjax.data.to_float)"
                if high > 1.0 else " (normalised to [-1, 1] or by mean/std? models normalise themselves)")
        raise ValueError(f"{what} must be float pixels in [0, 1], got values in [{low:.4g}, {high:.4g}]{hint}")
