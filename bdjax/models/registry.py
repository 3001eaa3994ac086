"""Model names used by the CLI and checkpoints, and how to build and initialise them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bdjax.data.dataset import DatasetInfo
from bdjax.models.mobilenet import mobilenet_v2, mobilenet_v2_torchvision
from bdjax.models.preact_resnet import preact_resnet18
from bdjax.models.resnet import resnet18, resnet_cifar
from bdjax.models.thesis import conv_pool_net
from bdjax.models.vgg import vgg_bn

BUILDERS = {
    "resnet20": functools.partial(resnet_cifar, 20),
    "resnet32": functools.partial(resnet_cifar, 32),
    "resnet56": functools.partial(resnet_cifar, 56),
    "resnet18": resnet18,
    "preact-resnet18": preact_resnet18,
    "preact-resnet18-backdoorbench": functools.partial(preact_resnet18, final_bn=False),
    "vgg11-bn": functools.partial(vgg_bn, 11),
    "vgg16-bn": functools.partial(vgg_bn, 16),
    "mobilenet-v2": mobilenet_v2,
    "mobilenet-v2-torchvision": mobilenet_v2_torchvision,
    "small": functools.partial(conv_pool_net, "small", use_bn=False),
    "small-bn": functools.partial(conv_pool_net, "small", use_bn=True),
    "medium": functools.partial(conv_pool_net, "medium", use_bn=False),
    "medium-bn": functools.partial(conv_pool_net, "medium", use_bn=True),
    "large": functools.partial(conv_pool_net, "large", use_bn=False),
    "large-bn": functools.partial(conv_pool_net, "large", use_bn=True),
}
MODEL_NAMES = tuple(BUILDERS)


def create(name: str, info: DatasetInfo):
    """The Flax module ``name`` for a dataset (class count, input normalisation and input shape)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return BUILDERS[name](info.num_classes, mean=tuple(info.mean), std=tuple(info.std),
                          image_shape=tuple(info.image_shape))


def init_variables(module, key, image_shape=(32, 32, 3)) -> dict:
    """variables = {"params": ..., "batch_stats": ...} (no batch_stats without BatchNorm)."""
    variables = jax.jit(module.init, static_argnames="train")(
        key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return dict(variables)


def count_params(variables) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
