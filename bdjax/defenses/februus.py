"""Februus (Doan, Abbasnejad, Ranasinghe, "Februus: Input purification defense against trojan
attacks on deep neural network systems", ACSAC 2020): every input is purified, none rejected.

For each input x:

1. Trojan removal: the Grad-CAM map of x's predicted class (``gradcam.grad_cam``: last conv
   unit, upsampled, min-max normalised to [0, 1]); the pixels where it reaches
   ``cam_threshold`` form the mask m and are replaced by a fill colour (the official code's
   ``mask >= MASK_COND`` on the upsampled map, filled with the mean pixel value of clean data).
2. Image restoration: an inpainting generator G trained on clean images only sees the filled
   image and m; the purified input is x·(1 − m) + G(x_filled, m)·m.
3. The model classifies the purified input.

A trigger draws the Grad-CAM of the target class onto itself, so it is removed and painted
over with what clean images look like there; a clean input loses (and gets back) the region
its class relies on, which costs some clean accuracy.

Deviations from the paper, for 32x32 images and a CPU:

- G is a small conv encoder-decoder (two stride-2 downsamplings, dilated convs at 1/4
  resolution, one full-resolution skip) trained with an L1 loss on the removed pixels only;
  the paper trains Iizuka et al.'s completion network with global + local discriminators
  (WGAN-GP). There is no adversarial term: on a few hundred clean images and a few minutes
  of CPU it would mostly add noise; the restored region is blurrier than a GAN's.
- G trains on the defender's clean set (the paper: on clean training data) with random
  masks: rectangles, and "random Grad-CAM" blobs (a ReLU'd Gaussian map on a 2x2, 4x4 or
  8x8 grid, upsampled and thresholded exactly as a real map is), so it sees the shapes
  step 1 removes at test time.
- The restored region is pasted directly (x·(1 − m) + G·m); the official code blends it in
  with Poisson blending.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import loops
from bdjax.checkpoint import atomic_write
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, register
from bdjax.defenses.cetf import region_mask
from bdjax.defenses.gradcam import default_feature_layer, grad_cam
from bdjax.defenses.strip import check_inputs
from bdjax.models.inference import padded_batches
from bdjax.trees import flat_items, npz_bytes, unflatten


@dataclasses.dataclass(frozen=True)
class InpainterConfig:
    """How the inpainting generator is trained (ours; the paper trains a GAN for hours on a GPU).

    - ``features`` 32 channels at full resolution (64 at 1/2 and 1/4): ~0.28 M parameters;
    - ``steps`` 1,000 Adam steps (``learning_rate`` 2e-3, cosine decay) of ``batch_size`` 32:
      about 4 minutes for 32x32 images (0.24 s a step measured on a shared 2-core CPU with
      other jobs running); the L1 loss has mostly levelled off by then;
    - ``rectangle_fraction`` 0.5 of the masks are rectangles with sides from 2 px up to
      ``max_rectangle`` (0.5) of the image side, the others random Grad-CAM blobs thresholded
      at the Februus ``cam_threshold``; images are flipped left-right at random.
    """

    features: int = 32
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 2e-3
    rectangle_fraction: float = 0.5
    max_rectangle: float = 0.5


# The official release's MASK_COND per dataset (its CIFAR-10 and GTSRB scripts).
OFFICIAL_THRESHOLDS = {"cifar10": 0.7, "gtsrb": 0.8}
DEFAULT_THRESHOLD = 0.7


@dataclasses.dataclass(frozen=True)
class FebruusConfig:
    """Februus' settings.

    - ``cam_threshold``: pixels of the normalised Grad-CAM map at or above it are removed;
      None (default) takes the official code's ``MASK_COND`` for the clean set's dataset
      (``OFFICIAL_THRESHOLDS``: CIFAR-10 0.7, GTSRB 0.8; 0.7 for others);
    - ``feature_layer``: the Grad-CAM layer (a module path; default
      ``gradcam.default_feature_layer``: a ResNet's last block, other models' last conv unit);
    - ``inpainter_file``: a generator saved by ``save_inpainter`` (e.g. trained once on more
      clean data); without it, one is trained on the defender's clean set with ``inpainter``
      and, if ``inpainter_out`` names a file, saved there;
    - ``batch_size`` inputs are purified per compiled call.
    """

    cam_threshold: float | None = None
    feature_layer: tuple[str, ...] | None = None
    inpainter: InpainterConfig = dataclasses.field(default_factory=InpainterConfig)
    inpainter_file: str | None = None
    inpainter_out: str | None = None
    batch_size: int = 64


# --------------------------------------------------------------------------- the generator
class InpaintingNet(nn.Module):
    """Februus' restoration: ``apply(variables, images f32[N, H, W, C], masks f32[N, H, W, 1])``
    -> f32[N, H, W, C], the images with their masked pixels (m = 1) painted over.

    ``variables`` = {"params", "stats": {"fill": f32[C]}}; the masked pixels are set to ``fill``
    (the clean images' mean colour) before the network sees them. ``generate`` returns the raw
    generator output (the training loss reads it)."""

    features: int = 32
    channels: int = 3

    def setup(self):
        self.fill = self.variable("stats", "fill", lambda: jnp.full((self.channels,), 0.5, jnp.float32))
        wide = 2 * self.features
        self.stem = nn.Conv(self.features, (5, 5))
        self.down1 = nn.Conv(wide, (3, 3), strides=(2, 2))
        self.down2 = nn.Conv(wide, (3, 3), strides=(2, 2))
        # Dilated convs widen the receptive field at 1/4 resolution (the completion network's idea).
        self.context = [nn.Conv(wide, (3, 3), kernel_dilation=(d, d)) for d in (1, 2, 4, 1)]
        self.up1 = nn.Conv(wide, (3, 3))
        self.up2 = nn.Conv(self.features, (3, 3))
        self.merge = nn.Conv(self.features, (3, 3))
        self.out = nn.Conv(self.channels, (3, 3))

    def generate(self, images, masks):
        filled = images * (1.0 - masks) + self.fill.value.reshape(1, 1, 1, -1) * masks
        full = nn.relu(self.stem(jnp.concatenate([filled, masks], axis=-1)))
        half = nn.relu(self.down1(full))
        x = nn.relu(self.down2(half))
        for conv in self.context:
            x = nn.relu(conv(x))
        x = nn.relu(self.up1(jax.image.resize(x, half.shape[:3] + x.shape[3:], "nearest")))
        x = nn.relu(self.up2(jax.image.resize(x, full.shape[:3] + x.shape[3:], "nearest")))
        x = nn.relu(self.merge(jnp.concatenate([x, full], axis=-1)))
        return nn.sigmoid(self.out(x))

    def __call__(self, images, masks):
        return images * (1.0 - masks) + self.generate(images, masks) * masks


def init_inpainter(key, image_shape, features: int = 32) -> tuple[InpaintingNet, dict]:
    """(module, variables) of an untrained generator for images of ``image_shape`` (H, W, C)."""
    module = InpaintingNet(features, image_shape[-1])
    images = jnp.zeros((1, *image_shape), jnp.float32)
    return module, module.init(key, images, images[..., :1])


# --------------------------------------------------------------------------- training masks
def rectangle_masks(key, count: int, height: int, width: int, max_fraction: float = 0.5) -> jax.Array:
    """f32[count, H, W, 1]: one random rectangle per mask, sides from 2 px to max_fraction of the side."""
    side_key, corner_key = jax.random.split(key)
    longest = jnp.array([[max(2, round(max_fraction * height)), max(2, round(max_fraction * width))]])
    sides = jax.random.randint(side_key, (count, 2), 2, longest + 1)
    room = jnp.array([[height, width]]) - sides + 1  # corners that keep the box inside
    corners = jnp.floor(jax.random.uniform(corner_key, (count, 2)) * room).astype(jnp.int32)
    boxes = jnp.concatenate([corners, sides], axis=1).astype(jnp.float32)
    return jax.vmap(lambda box: region_mask(box, height, width))(boxes).astype(jnp.float32)[..., None]


def cam_blob_masks(key, count: int, height: int, width: int, threshold: float = 0.7,
                   grids=(2, 4, 8)) -> jax.Array:
    """f32[count, H, W, 1]: random Grad-CAM-like masks, the pixels >= ``threshold`` of an
    upsampled, min-max normalised ReLU(Gaussian) map on a grid drawn from ``grids``."""
    pick_key, *grid_keys = jax.random.split(key, len(grids) + 1)
    candidates = []
    for grid, grid_key in zip(grids, grid_keys):
        coarse = jax.nn.relu(jax.random.normal(grid_key, (count, grid, grid)))
        cam = jax.image.resize(coarse, (count, height, width), "bilinear")
        low, high = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
        cam = (cam - low) / jnp.maximum(high - low, 1e-12)
        candidates.append(cam >= threshold)
    which = jax.random.randint(pick_key, (count,), 0, len(grids))
    masks = jnp.take_along_axis(jnp.stack(candidates, axis=1), which[:, None, None, None], axis=1)[:, 0]
    return masks.astype(jnp.float32)[..., None]


def training_masks(key, count: int, height: int, width: int, config: InpainterConfig,
                   cam_threshold: float = 0.7) -> jax.Array:
    """f32[count, H, W, 1]: rectangles (``config.rectangle_fraction`` of them) and Grad-CAM blobs."""
    rect_key, blob_key, pick_key = jax.random.split(key, 3)
    rectangles = rectangle_masks(rect_key, count, height, width, config.max_rectangle)
    blobs = cam_blob_masks(blob_key, count, height, width, cam_threshold)
    use_rectangle = jax.random.uniform(pick_key, (count, 1, 1, 1)) < config.rectangle_fraction
    return jnp.where(use_rectangle, rectangles, blobs)


def masked_l1(module, variables, images, masks) -> jax.Array:
    """Mean absolute error of the generator on the removed pixels (m = 1) only."""
    generated = module.apply(variables, images, masks, method=InpaintingNet.generate)
    errors = jnp.abs(generated - images) * masks
    return errors.sum() / jnp.maximum(masks.sum() * images.shape[-1], 1.0)


def _optimizer(config: InpainterConfig):
    return optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps))


def _train_step(consts, carry, key, *, module: InpaintingNet, config: InpainterConfig, cam_threshold: float):
    """One Adam step on a random batch of the clean images (consts = (images, stats))."""
    images, stats = consts
    params, opt_state = carry
    height, width = images.shape[1:3]
    index_key, flip_key, mask_key = jax.random.split(key, 3)
    batch = images[jax.random.randint(index_key, (config.batch_size,), 0, images.shape[0])]
    flip = jax.random.bernoulli(flip_key, 0.5, (config.batch_size, 1, 1, 1))
    batch = jnp.where(flip, batch[:, :, ::-1], batch)
    masks = training_masks(mask_key, config.batch_size, height, width, config, cam_threshold)
    loss, grads = jax.value_and_grad(
        lambda p: masked_l1(module, {"params": p, "stats": stats}, batch, masks))(params)
    updates, opt_state = _optimizer(config).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss


def train_inpainter(clean_images, key, config: InpainterConfig = InpainterConfig(),
                    cam_threshold: float = 0.7) -> tuple[InpaintingNet, dict, np.ndarray]:
    """Train Februus' generator on clean images only (uint8[N, H, W, C], N >= 1).

    Returns ``(module, variables, losses f32[steps])``; the fill colour is the images' mean.
    The Adam steps run in ``bdjax.loops.scan`` (a jitted step called from Python on CPU, where
    XLA runs conv gradients many times slower inside a ``lax.scan``).
    """
    clean_images = np.asarray(clean_images)
    if clean_images.dtype != np.uint8 or clean_images.ndim != 4:
        raise ValueError(f"train_inpainter takes clean uint8 images [N, H, W, C], "
                         f"got {clean_images.dtype}{list(clean_images.shape)}")
    if len(clean_images) == 0:
        raise ValueError("train_inpainter needs at least 1 clean image to learn what to paint, got 0")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"inpainter steps and batch_size must be >= 1, got {config.steps}, {config.batch_size}")
    images = jnp.asarray(to_float(clean_images))
    init_key, train_key = jax.random.split(key)
    module, variables = init_inpainter(init_key, images.shape[1:], config.features)
    variables = {"params": variables["params"], "stats": {"fill": images.mean(axis=(0, 1, 2))}}
    step = functools.partial(_train_step, module=module, config=config, cam_threshold=float(cam_threshold))
    (params, _), losses = loops.scan(step, (variables["params"], _optimizer(config).init(variables["params"])),
                                     jax.random.split(train_key, config.steps), consts=(images, variables["stats"]))
    return module, {"params": params, "stats": variables["stats"]}, np.asarray(losses)


# --------------------------------------------------------------------------- saving
def save_inpainter(path, module: InpaintingNet, variables: dict) -> Path:
    """Write the generator as one ``.npz`` (every leaf under its '/'-joined path, plus its width)."""
    arrays = {key: np.asarray(leaf) for key, leaf in flat_items(variables)}
    arrays["module/features"] = np.array(module.features)
    path = Path(path)
    atomic_write(path, npz_bytes(arrays))
    return path


def load_inpainter(path) -> tuple[InpaintingNet, dict]:
    """(module, variables) from ``save_inpainter``; a clear error for a file that is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"Februus inpainter file {path} does not exist") from None
    except Exception as err:  # not an npz, truncated, pickled objects
        raise ValueError(f"{path} is not a readable inpainter .npz ({type(err).__name__}: {err})") from None
    try:
        features = int(arrays.pop("module/features"))
        fill = arrays["stats/fill"]
    except KeyError as err:
        raise ValueError(f"{path} is not a Februus inpainter (no {err.args[0]!r}; "
                         "write it with save_inpainter)") from None
    module, template = init_inpainter(jax.random.key(0), (8, 8, fill.shape[0]), features)
    variables = unflatten({key: jnp.asarray(value) for key, value in arrays.items()})
    want = jax.tree_util.tree_map(np.shape, template)
    if jax.tree_util.tree_structure(variables) != jax.tree_util.tree_structure(template) or \
            jax.tree_util.tree_map(np.shape, variables) != want:
        raise ValueError(f"{path} does not hold an inpainter of {features} features for {fill.shape[0]} channels")
    return module, variables


# --------------------------------------------------------------------------- purification
@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _purify(module, variables, inpainter, inpainter_variables, images, layer, threshold):
    cams, predicted = grad_cam(module, variables, images, layer)
    masks = (cams >= threshold).astype(images.dtype)[..., None]
    purified = inpainter.apply(inpainter_variables, images, masks)
    logits = module.apply(variables, purified, train=False)
    return purified, masks[..., 0], jnp.argmax(logits, axis=-1).astype(jnp.int32), predicted.astype(jnp.int32)


@dataclasses.dataclass
class Purification:
    """Februus on N inputs (NumPy)."""

    predicted: np.ndarray  # int32[N] the model's class of each purified input
    original: np.ndarray  # int32[N] its class of the input as given
    removed: np.ndarray  # f32[N] fraction of pixels removed and restored
    purified: np.ndarray | None = None  # f32[N, H, W, C] when asked for

    def split(self, count: int) -> tuple[Purification, Purification]:
        """(the first ``count`` inputs, the rest)."""
        def part(where):
            return Purification(*(None if value is None else value[where] for value in
                                  (self.predicted, self.original, self.removed, self.purified)))
        return part(slice(0, count)), part(slice(count, None))


def resolved(config: FebruusConfig, dataset: str | None) -> FebruusConfig:
    """``config`` with its threshold filled in: the official code's for ``dataset`` when unset."""
    if config.cam_threshold is not None:
        return config
    return dataclasses.replace(config, cam_threshold=OFFICIAL_THRESHOLDS.get(dataset, DEFAULT_THRESHOLD))


def purify(module, variables, inpainter: tuple[InpaintingNet, dict], images, config: FebruusConfig,
           keep_images: bool = False) -> Purification:
    """Remove the Grad-CAM region of every input (uint8[N, H, W, C]), restore it and classify."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"Februus purifies images [N, H, W, C], got shape {images.shape}")
    if config.cam_threshold is None:
        raise ValueError("purify needs a cam_threshold: pass februus.resolved(config, dataset_name), which "
                         "fills in the official code's threshold for the dataset, or set one")
    if not 0.0 < config.cam_threshold <= 1.0:
        raise ValueError(f"cam_threshold must lie in (0, 1], got {config.cam_threshold}")
    if len(images) == 0:
        empty = np.zeros((0,), np.int32)
        return Purification(empty, empty, empty.astype(np.float32),
                            np.zeros((0, *images.shape[1:]), np.float32) if keep_images else None)
    layer = None if config.feature_layer is None else tuple(config.feature_layer)
    inpainter_module, inpainter_variables = inpainter
    parts = []
    for chunk, count in padded_batches(images, max(1, config.batch_size)):
        out = jax.device_get(_purify(module, variables, inpainter_module, inpainter_variables, chunk, layer,
                                     config.cam_threshold))
        parts.append([part[:count] for part in out])
    purified, masks, predicted, original = (np.concatenate(p) for p in zip(*parts))
    return Purification(predicted, original, masks.mean(axis=(1, 2)), purified if keep_images else None)


def defender_inpainter(clean: Dataset, key, config: FebruusConfig) -> tuple[InpaintingNet, dict, dict]:
    """The generator from ``config.inpainter_file``, or one trained on ``clean``: (module, variables, info)."""
    if config.inpainter_file:
        module, variables = load_inpainter(config.inpainter_file)
        return module, variables, {"inpainter_file": str(config.inpainter_file)}
    if clean is None or len(clean) == 0:
        raise ValueError("Februus trains its inpainter on the defender's clean images: the clean set is empty "
                         "(give at least 1 image, or a trained generator as inpainter_file)")
    module, variables, losses = train_inpainter(clean.images, key, config.inpainter, config.cam_threshold)
    info = {"inpainter_trained_on": len(clean), "inpainter_loss_first": float(losses[:10].mean()),
            "inpainter_loss_last": float(losses[-10:].mean())}
    if config.inpainter_out:
        info["inpainter_out"] = str(save_inpainter(config.inpainter_out, module, variables))
    return module, variables, info


@register("februus", FebruusConfig, kind="input filter",
          paper="Doan et al., ACSAC 2020",
          detector=True, summary="Februus input purification (Grad-CAM removal + inpainting; rejects nothing)")
def februus(module, variables, clean: Dataset, key, config: FebruusConfig = FebruusConfig()) -> DefenseResult:
    """Februus as a test-time rule: the classifier returns the model's class of each purified
    input and rejects nothing (so its TPR and FPR are 0 by construction; ACC / ASR are what it
    changes). ``info["inpainter"]`` is the generator, (module, variables); ``info["cam_threshold"]``
    the threshold used, ``info["feature_layer"]`` the Grad-CAM layer; ``info["screened"]`` gets,
    per classifier call, the mean removed area and how many predictions purification changed."""
    config = resolved(config, clean.info.name if clean is not None else None)
    if not 0.0 < config.cam_threshold <= 1.0:
        raise ValueError(f"cam_threshold must lie in (0, 1], got {config.cam_threshold}")
    image_shape = getattr(module, "image_shape", None) or (clean.images.shape[1:] if clean is not None else None)
    inpainter_module, inpainter_variables, info = defender_inpainter(clean, key, config)
    layer = config.feature_layer if config.feature_layer is not None else default_feature_layer(module)
    info.update(inpainter=(inpainter_module, inpainter_variables), screened=[], cam_threshold=config.cam_threshold,
                feature_layer="/".join(layer))

    def classify(images):
        images = check_inputs(images, image_shape, "Februus") if image_shape is not None else np.asarray(images)
        found = purify(module, variables, (inpainter_module, inpainter_variables), images, config)
        info["screened"].append({"count": len(found.predicted),
                                 "removed_mean": float(found.removed.mean()) if len(found.removed) else float("nan"),
                                 "changed": int((found.predicted != found.original).sum())})
        return found.predicted, np.zeros(found.predicted.shape, bool)

    return DefenseResult(variables, classifier=classify, info=info)
