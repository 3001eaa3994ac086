"""Architectures: every model maps [N, 32, 32, 3] images to [N, C] logits, declares each of
its convolutions with the BatchNorm that really normalises it, and the thesis networks have
exactly the parameter counts of table 5.1.

Checks that need only shapes and the traced data flow run under ``jax.eval_shape``, so the
big models are traced once each but never compiled.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.data.dataset import GTSRB, to_float
from bdjax.models import MODEL_NAMES, batched_logits, count_params, create, predict
from bdjax.surgery import get_path

IMAGE_SHAPE = (32, 32, 3)


def abstract_forward(module, num_images: int = 3):
    """Shapes of the variables and logits, and the conv -> BatchNorm edges of the data flow.

    Returns ``(variables, logits, edges, convs)``: ``(c, b)`` is in ``edges`` when BatchNorm
    ``b`` reads exactly the array conv ``c`` returned; ``convs`` lists every conv's path.
    """
    found = {}

    def traced(key, images):
        variables = module.init(key, images[:1], train=False)
        conv_outputs, bn_inputs = {}, {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
                conv_outputs[context.module.path] = out
            elif context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm):
                bn_inputs[context.module.path] = args[0]
            return out

        with nn.intercept_methods(record):
            logits = module.apply(variables, images, train=False)
        # Tracer identity only means something inside the trace, so compare here.
        found["edges"] = {(c, b) for c, out in conv_outputs.items()
                          for b, inp in bn_inputs.items() if inp is out}
        found["convs"] = sorted(conv_outputs)
        return variables, logits

    variables, logits = jax.eval_shape(traced, jax.random.key(0),
                                       jnp.zeros((num_images, *IMAGE_SHAPE), jnp.float32))
    return variables, logits, found["edges"], found["convs"]


# Conv -> BN edges that are deliberately NOT pairs: the conv's output also bypasses the BN.
# The PreAct stem feeds stage1_0/bn1 *and* the identity shortcut around it, so zeroing a bn1
# neuron would not silence the stem channel; declaring the pair would mislead CLP-like code.
FAN_OUT_EDGES = {
    "preact-resnet18": {(("conv",), ("stage1_0", "bn1"))},
    "preact-resnet18-backdoorbench": {(("conv",), ("stage1_0", "bn1"))},
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_architecture_outputs_logits_and_declares_true_conv_bn_pairs(name):
    module = create(name, GTSRB)
    variables, logits, conv_to_bn_edges, all_convs = abstract_forward(module, num_images=3)
    units = module.conv_units()

    assert logits.shape == (3, GTSRB.num_classes)
    assert logits.dtype == jnp.float32

    # Every convolution of the network is declared, once.
    assert sorted(u.conv for u in units) == all_convs
    # The declared pairs are exactly the conv -> BatchNorm edges of the data flow (minus the
    # documented fan-outs): a pair is real, and an unpaired conv feeds no BN directly.
    declared = {(u.conv, u.bn) for u in units if u.bn is not None}
    assert declared == conv_to_bn_edges - FAN_OUT_EDGES.get(name, set())

    params, stats = variables["params"], variables.get("batch_stats", {})
    for unit in units:
        out_channels = get_path(params, unit.conv)["kernel"].shape[-1]
        if unit.bn is None:
            continue
        for leaf in ("scale", "bias"):
            assert get_path(params, unit.bn)[leaf].shape == (out_channels,), (unit.name, leaf)
        for leaf in ("mean", "var"):
            assert get_path(stats, unit.bn)[leaf].shape == (out_channels,), (unit.name, leaf)


@pytest.mark.parametrize("name, expected", [
    ("small", 30_203), ("small-bn", 30_347), ("medium", 130_091), ("medium-bn", 130_411),
    ("large", 516_139), ("large-bn", 516_779),
])
def test_thesis_models_have_the_parameter_counts_of_table_5_1(name, expected):
    # Table 5.1 is for GTSRB (43 classes); BN adds scale and bias per channel.
    variables, *_ = abstract_forward(create(name, GTSRB), num_images=1)
    assert count_params(variables) == expected


def test_thesis_bn_variants_put_a_batchnorm_after_every_conv():
    for size in ("small", "medium", "large"):
        plain, with_bn = create(size, GTSRB), create(f"{size}-bn", GTSRB)
        assert all(u.bn is None for u in plain.conv_units())
        assert [u.bn for u in with_bn.conv_units()] == [(f"bn{i}",) for i in range(len(plain.conv_units()))]


def test_preact_resnet_pairs_conv1_with_bn2_and_leaves_conv2_and_shortcut_unpaired():
    # In a pre-activation block, bn2 normalises conv1's output; conv2 and the projection are
    # summed and only then reach the NEXT block's bn1, so no single BN belongs to either.
    # Pairing by registration order (conv2 -> bn2) is the CLP-on-PreAct bug.
    units = {u.conv: u for u in create("preact-resnet18", GTSRB).conv_units()}
    assert units[("conv",)].bn is None  # see FAN_OUT_EDGES
    blocks = sorted({path[0] for path in units if len(path) == 2})
    assert len(blocks) == 8
    for block in blocks:
        assert units[(block, "conv1")].bn == (block, "bn2")
        assert units[(block, "conv2")].bn is None
        if (block, "shortcut_conv") in units:
            assert units[(block, "shortcut_conv")].bn is None
            assert units[(block, "shortcut_conv")].shortcut
    assert sum((b, "shortcut_conv") in units for b in blocks) == 3  # stages 2-4 change shape


def test_resnet_projection_shortcut_is_paired_with_its_own_bn():
    units = {u.conv: u for u in create("resnet18", GTSRB).conv_units()}
    shortcut = units[("stage2_0", "shortcut_conv")]
    assert shortcut.shortcut and shortcut.bn == ("stage2_0", "shortcut_bn")
    # CIFAR ResNet-20 uses parameter-free (option A) shortcuts: no shortcut convs at all.
    assert not any(u.shortcut for u in create("resnet20", GTSRB).conv_units())


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet20"):
        create("resnet-20", GTSRB)


def test_models_reject_uint8_pixels_with_a_clear_error(tiny_model, uint8_images):
    module, variables = tiny_model("small")
    with pytest.raises(TypeError, match="float pixels in \\[0, 1\\].*to_float"):
        module.apply(variables, jnp.asarray(uint8_images), train=False)


def test_models_reject_unbatched_images(tiny_model, images):
    module, variables = tiny_model("small")
    with pytest.raises(ValueError, match=r"float\[N, H, W, C\]"):
        module.apply(variables, images[0], train=False)


@pytest.mark.parametrize("name", ["small-bn", "resnet20"])
def test_batched_logits_and_predict_equal_a_direct_apply(tiny_model, uint8_images, name):
    module, variables = tiny_model(name)
    images = np.concatenate([uint8_images, uint8_images[:1]])  # 7 images
    floats = to_float(images)
    direct = np.asarray(module.apply(variables, jnp.asarray(floats), train=False))
    assert direct.shape == (7, 4)

    # batch size 3 does not divide 7: the last batch is padded and trimmed.
    np.testing.assert_allclose(batched_logits(module, variables, floats, batch_size=3), direct,
                               rtol=1e-5, atol=1e-5)
    # uint8 inputs are converted with to_float, the one conversion the project uses.
    np.testing.assert_allclose(batched_logits(module, variables, images, batch_size=3), direct,
                               rtol=1e-5, atol=1e-5)
    pred = predict(module, variables, images, batch_size=3)
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(pred, direct.argmax(-1))


def test_predict_on_no_images_returns_no_predictions(tiny_model):
    module, variables = tiny_model("small")
    assert predict(module, variables, np.zeros((0, *IMAGE_SHAPE), np.uint8)).shape == (0,)


# --------------------------------------------------------------------------- inputs at the boundary (issue 33)
@pytest.mark.parametrize("bad, message", [
    (lambda x: to_float(x) * 255.0, r"images must be float pixels in \[0, 1\], got values in \[0, 255\].*0\.\.255"),
    (lambda x: to_float(x) * 2.0 - 1.0, r"got values in \[-1, 1\].*\[-1, 1\]"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, to_float(x)).astype(np.float32),
     "images hold NaN or infinite values"),
    (lambda x: x[..., :1], r"images are 32x32x1 \(H x W x C\) per image but the model takes 32x32x3"),
    (lambda x: x[:, :28, :28], "images are 28x28x3"),
    (lambda x: x.astype(np.int64), "must be uint8 stored pixels or floats"),
])
def test_predict_refuses_inputs_it_would_classify_silently_wrong(tiny_model, uint8_images, bad, message):
    module, variables = tiny_model("resnet20")  # global pooling: any size would run
    with pytest.raises((ValueError, TypeError), match=message):
        predict(module, variables, bad(uint8_images))
    # Floats in [0, 1] stay valid inputs and give the uint8 predictions.
    np.testing.assert_array_equal(predict(module, variables, to_float(uint8_images)),
                                  predict(module, variables, uint8_images))


def test_a_model_refuses_grey_or_resized_images_even_inside_jit(tiny_model, images):
    module, variables = tiny_model("resnet20")
    apply = jax.jit(lambda x: module.apply(variables, x, train=False))
    with pytest.raises(ValueError, match="images are 32x32x1 .* this model takes 32x32x3"):
        apply(images[..., :1])
    with pytest.raises(ValueError, match="images are 40x40x3"):
        apply(jnp.zeros((2, 40, 40, 3)))
