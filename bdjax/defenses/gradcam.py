"""Grad-CAM (Selvaraju et al., ICCV 2017) for any bdjax model, batched and jit-compiled.

The map of image n for its predicted class c is ReLU(Σ_k α_k A_k), with A the feature map of
one layer and α_k the spatial mean of ∂logit_c / ∂A_k; it is upsampled (bilinear) to the input
size and min-max normalised to [0, 1] per image. The feature layer defaults to the model's
``gradcam_layer()`` when it declares one (the ResNets: the last residual block's output, after
the shortcut sum, as pytorch-grad-cam's ``model.layer4[-1]``), otherwise to the output of the
last (non-shortcut) conv unit, i.e. its BatchNorm output when it has one (before the
nonlinearity; ``ConvUnit.output``); it is read through ``surgery.apply_with_edits``.

Until 2026-12-05 the ResNets used the last conv unit too: the residual branch's BN output
before the shortcut sum. On a GTSRB ResNet-20 with a 2x2 corner patch that map hardly sees the
trigger (mean normalised value 0.29 on the trigger pixels of 64 triggered inputs; 0.64 on the
block output: ``tests/test_cetf.py``). Februus there still leaves ASR 1.00 with either layer
(the block's map peaks a cell in from the corner): clean ACC 0.30 before (10 + 10 inputs,
``experiments/results/cetf_v2_probe.json`` as committed before 2026-12-05), 0.47 after (200 +
200 inputs, 3 seeds: ``experiments/results/cetf_tables_v2.md`` and its diagnosis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bdjax.models.base import Path
from bdjax.surgery import apply_with_edits


def default_feature_layer(module) -> Path:
    """The usual Grad-CAM layer: ``module.gradcam_layer()`` when the model declares one (the
    residual networks' last block), else the path of the last non-shortcut conv unit's output."""
    declared = getattr(module, "gradcam_layer", None)
    if callable(declared):
        return tuple(declared())
    units = [u for u in module.conv_units() if not u.shortcut]
    if not units:
        raise ValueError(f"{type(module).__name__} declares no conv units; pass a feature layer path")
    return units[-1].output


@functools.partial(jax.jit, static_argnums=(0, 3))
def _grad_cam(module, variables, images, layer: Path):
    def forward(delta):
        # A zero perturbation of the layer's output: its gradient is ∂logits/∂A.
        logits, captured = apply_with_edits(module, variables, images,
                                            edits={layer: lambda out: out + delta}, capture=[layer])
        return logits, captured[layer]

    feature_shape = jax.eval_shape(lambda: forward(0.0)[1]).shape
    zeros = jnp.zeros(feature_shape, images.dtype)

    def predicted_class_score(delta):
        logits, features = forward(delta)
        predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
        # Each image's logit depends only on its own features, so one grad of the sum is batched.
        score = jnp.take_along_axis(logits, predicted[:, None], axis=1).sum()
        return score, (features, predicted)

    grads, (features, predicted) = jax.grad(predicted_class_score, has_aux=True)(zeros)
    weights = grads.mean(axis=(1, 2))  # α: [N, c]
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features, weights))
    n, height, width = images.shape[:3]
    cam = jax.image.resize(cam, (n, height, width), method="bilinear")
    low = cam.min(axis=(1, 2), keepdims=True)
    high = cam.max(axis=(1, 2), keepdims=True)
    cam = jnp.where(high > low, (cam - low) / jnp.maximum(high - low, 1e-12), 0.0)
    return cam, predicted


def grad_cam(module, variables, images, layer: Path | None = None) -> tuple[jax.Array, jax.Array]:
    """Normalised Grad-CAM maps of the predicted classes.

    images: f32[N, H, W, C] in [0, 1]; layer: module path of the feature map (default
    ``default_feature_layer(module)``). Returns ``(maps f32[N, H, W] in [0, 1], predicted int32[N])``;
    an image whose map is constant gets all zeros.
    """
    layer = default_feature_layer(module) if layer is None else tuple(layer)
    return _grad_cam(module, variables, jnp.asarray(images), layer)
