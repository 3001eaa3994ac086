"""Every registered defense checks its inputs at the public boundary (issue 33): a clean set of
another dataset (image size, channels, class count), a raw array or a wrong config is refused,
naming the argument, before any work, instead of giving a silently wrong repair."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from bdjax import defenses
from bdjax.data.dataset import Dataset

from conftest import SYNTHETIC_INFO, random_uint8


def _clean(info, n=8):
    return Dataset(random_uint8(n, shape=info.image_shape), np.arange(n) % info.num_classes, info)


@pytest.mark.parametrize("method", sorted(defenses.DEFENSES))
def test_a_clean_set_the_model_cannot_take_is_refused_naming_it(method, tiny_model):
    module, variables = tiny_model("small-bn")  # 4 classes, 32x32x3
    spec, name = defenses.get(method), re.escape(method)
    config, key = spec.config_cls(), jax.random.key(0)
    bigger = dataclasses.replace(SYNTHETIC_INFO, image_shape=(40, 40, 3))
    with pytest.raises(ValueError, match=f"{name}: clean images are 40x40x3 .* the model takes 32x32x3"):
        spec.fn(module, variables, _clean(bigger), key, config)
    more_classes = dataclasses.replace(SYNTHETIC_INFO, name="ten", num_classes=10)
    with pytest.raises(ValueError, match=f"{name}: clean is a ten set of 10 classes but the model has 4"):
        spec.fn(module, variables, _clean(more_classes, 10), key, config)
    with pytest.raises(TypeError, match=f"{name}: clean must be a bdjax.data.Dataset"):
        spec.fn(module, variables, random_uint8(4), key, config)
    with pytest.raises(TypeError, match=f"{name}: config must be a {spec.config_cls.__name__}"):
        spec.fn(module, variables, _clean(SYNTHETIC_INFO), key, {"epochs": 1})
