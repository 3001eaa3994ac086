"""PyTorch ``state_dict`` <-> bdjax ``(module, variables)``, and reading / writing PyTorch files.

Layouts (the PyTorch module names each bdjax architecture is read from and written to):

- ``preact-resnet18``: BackdoorBench's PreActResNet18 (``conv1``, ``layer{1-4}.{0,1}.bn1 / conv1
  / bn2 / conv2 / shortcut.0``, ``linear``). BackdoorBench pools the last block's sum with no
  BN-ReLU; such a file becomes bdjax's ``preact-resnet18-backdoorbench``, one with a final
  ``bn`` (the pre-activation paper's design, bdjax's own ``preact-resnet18``) stays that.
- ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no max-pool; ``conv1``, ``bn1``,
  ``layer*.*.shortcut.0/1``, ``linear``). torchvision's ImageNet ResNet-18 (7x7 stride-2 stem
  plus max-pool, ``downsample``, ``fc``) is a different network and is refused.
- ``resnet20``: the common CIFAR ResNet-20 (``conv1``, ``bn1``, ``layer{1-3}.{0-2}.*``,
  ``linear``) with parameter-free zero-padding shortcuts (option A).
- ``vgg11-bn`` / ``vgg16-bn``: torchvision naming of the layers (``features.N`` for every
  conv and BatchNorm in ``Sequential`` order) with the CIFAR head ``classifier``
  (Linear(512, classes)); torchvision's 4096-wide three-layer ImageNet head is refused.
- ``mobilenet-v2-torchvision``: torchvision's MobileNetV2 as BackdoorBench trains it on 32x32
  images (``features.N``, ``classifier.1`` = Linear(1280, classes)). bdjax's ``mobilenet-v2``
  (the CIFAR port) is a different network and has no PyTorch layout here.

Conv kernels OIHW <-> HWIO, linear weights transposed, BatchNorm weight / bias -> ``params``
scale / bias and running mean / var -> ``batch_stats`` (eps 1e-5 on both sides; BN
``num_batches_tracked`` is read and ignored, written as 0). Arrays here are NumPy; only
``load_file`` and ``save_state_dict`` import torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import zipfile
from pathlib import Path

import jax
import numpy as np

from bdjax import models
from bdjax.data.dataset import INFOS, DatasetInfo
from bdjax.interop import TORCH_MODELS
from bdjax.models.mobilenet import MobileNetV2
from bdjax.models.preact_resnet import PreActResNet
from bdjax.models.resnet import ResNet
from bdjax.models.vgg import VGG

# The bdjax model a BackdoorBench PreActResNet18 (no BN-ReLU before pooling) is read into.
BACKDOORBENCH_PREACT = "preact-resnet18-backdoorbench"
# BackdoorBench's ``model_name`` values -> bdjax model names.
BACKDOORBENCH_MODELS = {"preactresnet18": "preact-resnet18", "resnet18": "resnet18", "vgg11_bn": "vgg11-bn",
                        "vgg16_bn": "vgg16-bn", "mobilenet_v2": "mobilenet-v2-torchvision", "resnet20": "resnet20"}
# BackdoorBench's input normalisation per dataset (utils/dataset_preprocess's
# get_dataset_normalization): what its models saw instead of [0, 1] pixels.
BACKDOORBENCH_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
INSTALL_HINT = "PyTorch is not installed: pip install 'bdjax[torch]' (the CPU wheel is enough)"


class TorchInteropError(ValueError):
    """A PyTorch file that cannot be read, or does not hold the architecture it is read as."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One PyTorch module with parameters and the bdjax module it corresponds to."""

    kind: str  # "conv", "bn" or "linear"
    path: tuple[str, ...]  # in bdjax's params / batch_stats
    torch_name: str  # the PyTorch module's name in the state_dict (``layer1.0.conv1``)


# --------------------------------------------------------------------------- layouts

def _resnet_name(module, path: tuple[str, ...]) -> str:
    top = {"conv": "conv1", "bn": "bn" if isinstance(module, PreActResNet) else "bn1", "classifier": "linear"}
    if len(path) == 1:
        return top[path[0]]
    stage, index = path[0].removeprefix("stage").split("_")
    inner = {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(path[1], path[1])
    return f"layer{stage}.{index}.{inner}"


def _vgg_name(module, path: tuple[str, ...]) -> str:
    if path == ("classifier",):
        return "classifier"
    # torchvision's ``features`` Sequential: conv, BN, ReLU per width, one MaxPool per "M".
    positions, position = [], 0
    for width in module.config:
        if width != "M":
            positions.append(position)
        position += 1 if width == "M" else 3
    index = int(path[0].removeprefix("conv").removeprefix("bn"))
    return f"features.{positions[index] + (1 if path[0].startswith('bn') else 0)}"


def _mobilenet_name(module, path: tuple[str, ...]) -> str:
    top = {"conv": "features.0.0", "bn": "features.0.1", "classifier": "classifier.1"}
    blocks = module._blocks()
    top.update({"head_conv": f"features.{len(blocks) + 1}.0", "head_bn": f"features.{len(blocks) + 1}.1"})
    if len(path) == 1:
        return top[path[0]]
    index, expansion = next((i, b[1]) for i, b in enumerate(blocks) if b[0] == path[0])
    # torchvision's block.conv: [expand conv, BN] (not for expansion 1), [depthwise conv, BN], conv, BN
    inner = ({"conv2": "0.0", "bn2": "0.1", "conv3": "1", "bn3": "2"} if expansion == 1 else
             {"conv1": "0.0", "bn1": "0.1", "conv2": "1.0", "bn2": "1.1", "conv3": "2", "bn3": "3"})
    return f"features.{index + 1}.conv.{inner[path[1]]}"


def _names_for(module):
    if isinstance(module, MobileNetV2) and not module.torchvision:
        raise TorchInteropError(
            "bdjax's mobilenet-v2 is the CIFAR port (stride-1 stem, 1x1 expansion in every block, shortcut "
            "convs), not torchvision's MobileNetV2 (stride-2 stem, no expansion conv in the first block, no "
            "shortcut convs): PyTorch's mobilenet_v2 is read as mobilenet-v2-torchvision")
    for cls, name_fn in ((PreActResNet, _resnet_name), (ResNet, _resnet_name), (VGG, _vgg_name),
                         (MobileNetV2, _mobilenet_name)):
        if isinstance(module, cls):
            return name_fn
    raise TorchInteropError(f"no PyTorch layout for {type(module).__name__}; "
                            f"supported: {', '.join(TORCH_MODELS)}")


def layers(module, image_shape=(32, 32, 3)) -> list[Layer]:
    """Every layer with parameters of ``module``, in the order of its parameter tree."""
    name_fn = _names_for(module)
    params = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), image_shape))["params"]
    found = []

    def walk(node, path):
        if "kernel" in node:
            kind = "conv" if len(node["kernel"].shape) == 4 else "linear"
            found.append(Layer(kind, path, name_fn(module, path)))
        elif "scale" in node:
            found.append(Layer("bn", path, name_fn(module, path)))
        else:
            for key in node:
                walk(node[key], (*path, key))
    walk(params, ())
    return found


def _torch_entries(layer: Layer, variables) -> dict[str, np.ndarray]:
    """The layer's PyTorch tensors (as NumPy) from bdjax ``variables``."""
    params = _get(variables["params"], layer.path)
    name = layer.torch_name
    if layer.kind == "conv":
        out = {f"{name}.weight": np.transpose(np.asarray(params["kernel"]), (3, 2, 0, 1))}
    elif layer.kind == "linear":
        out = {f"{name}.weight": np.asarray(params["kernel"]).T}
    else:
        stats = _get(variables["batch_stats"], layer.path)
        return {f"{name}.weight": np.asarray(params["scale"]), f"{name}.bias": np.asarray(params["bias"]),
                f"{name}.running_mean": np.asarray(stats["mean"]), f"{name}.running_var": np.asarray(stats["var"]),
                f"{name}.num_batches_tracked": np.zeros((), np.int64)}
    if "bias" in params:
        out[f"{name}.bias"] = np.asarray(params["bias"])
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def to_state_dict(module, variables, image_shape=(32, 32, 3)) -> dict[str, np.ndarray]:
    """bdjax ``variables`` -> a PyTorch ``state_dict`` of NumPy arrays (float32; BN counters int64)."""
    state = {}
    for layer in layers(module, image_shape):
        state.update(_torch_entries(layer, variables))
    return {key: np.array(value, order="C") for key, value in state.items()}  # writable, contiguous copies


def expected_shapes(module, image_shape=(32, 32, 3)) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> tensor shape of the state_dict ``module`` is read from."""
    abstract = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), image_shape))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract)
    return {k: v.shape for k, v in to_state_dict(module, zeros, image_shape).items()}


def from_state_dict(state_dict: dict, module, image_shape=(32, 32, 3), model_name: str = "") -> dict:
    """A PyTorch ``state_dict`` (tensors or arrays) -> bdjax ``variables`` for ``module``.

    Raises TorchInteropError naming the missing / unexpected keys (with what the file looks
    like instead when it is a known other layout), the first key whose shape differs, or the
    first tensor with non-finite values.
    """
    arrays = {key: _as_numpy(key, value) for key, value in state_dict.items()}
    want = expected_shapes(module, image_shape)
    model_name = model_name or type(module).__name__
    counters = {k for k in want if k.endswith(".num_batches_tracked")}
    missing = [k for k in want if k not in arrays and k not in counters]
    unexpected = [k for k in arrays if k not in want]  # in the file's order
    if missing or unexpected:
        hint = _layout_hint(model_name, arrays)
        raise TorchInteropError(
            f"the state_dict is not a {model_name} in bdjax's PyTorch layout: "
            f"{len(missing)} missing key(s) {_few(missing)}, {len(unexpected)} unexpected key(s) "
            f"{_few(unexpected)}" + (f"; {hint}" if hint else ""))
    for key, value in arrays.items():  # the file's order: the first differing key is the file's first
        if key not in counters and value.shape != want[key]:
            raise TorchInteropError(f"{key} has shape {tuple(value.shape)} in the state_dict but "
                                    f"{model_name} for this dataset expects {want[key]} (the first differing key)")
    for key, value in arrays.items():
        if key not in counters and not np.isfinite(value).all():
            raise TorchInteropError(f"{key} holds NaN or inf values; a diverged model is not imported")
    variables: dict = {"params": {}}
    for layer in layers(module, image_shape):
        name = layer.torch_name
        if layer.kind == "conv":
            _set(variables["params"], (*layer.path, "kernel"), np.transpose(arrays[f"{name}.weight"], (2, 3, 1, 0)))
        elif layer.kind == "linear":
            _set(variables["params"], (*layer.path, "kernel"), arrays[f"{name}.weight"].T)
        else:
            _set(variables["params"], (*layer.path, "scale"), arrays[f"{name}.weight"])
            _set(variables["params"], (*layer.path, "bias"), arrays[f"{name}.bias"])
            stats = variables.setdefault("batch_stats", {})
            _set(stats, (*layer.path, "mean"), arrays[f"{name}.running_mean"])
            _set(stats, (*layer.path, "var"), arrays[f"{name}.running_var"])
        if layer.kind != "bn" and f"{name}.bias" in arrays:
            _set(variables["params"], (*layer.path, "bias"), arrays[f"{name}.bias"])
    return jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, np.float32), variables)


def _as_numpy(key, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor (bfloat16 has no NumPy dtype: go through float32)
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    if not isinstance(value, np.ndarray) or not (np.issubdtype(value.dtype, np.number)):
        raise TorchInteropError(f"{key} is a {type(value).__name__}, not a tensor: not a state_dict entry")
    return value if key.endswith(".num_batches_tracked") else value.astype(np.float32)


def _few(keys, count: int = 5) -> str:
    return "[" + ", ".join(keys[:count]) + (", ..." if len(keys) > count else "") + "]"


def _layout_hint(model_name: str, arrays: dict) -> str:
    """What a state_dict that does not fit ``model_name`` looks like instead, where we know."""
    keys = set(arrays)
    stem = arrays.get("conv1.weight")
    if any(".downsample." in k for k in keys) or "fc.weight" in keys:
        what = "torchvision's ResNet naming (downsample, fc)"
        if stem is not None and stem.shape[-1] == 7:
            what += (" with the ImageNet stem (7x7 stride-2 conv1 and a max-pool); bdjax's ResNets have "
                     "the CIFAR stem (3x3 stride-1 conv1, no max-pool), so it cannot be read exactly")
        return what
    if "classifier.0.weight" in keys:
        return ("this is torchvision's VGG head (classifier.0/3/6: 25088-4096-4096-classes after a 7x7 "
                "adaptive pool); bdjax's VGG has the CIFAR head, one Linear(512, classes) named classifier")
    if model_name == "resnet20" and any(".shortcut." in k for k in keys):
        return ("the file has projection shortcuts (option B, shortcut.0/1 convs); bdjax's resnet20 uses "
                "parameter-free zero-padding shortcuts (option A)")
    for name in TORCH_MODELS:
        if name != model_name and _keys_of(name) == keys - {k for k in keys if k.endswith(".num_batches_tracked")}:
            return f"its keys are those of {name}: pass --model {name}"
    return ""


def _keys_of(name: str) -> set[str]:
    from bdjax.data.dataset import CIFAR10
    module = models.create(name, CIFAR10)
    return {k for k in expected_shapes(module) if not k.endswith(".num_batches_tracked")}


# --------------------------------------------------------------------------- model names

def resolve_model(name: str, keys) -> str:
    """The bdjax model a ``state_dict`` with ``keys`` asked to be read as ``name`` becomes.

    BackdoorBench's PreActResNet18 has no BN-ReLU before pooling: without ``bn.*`` keys a
    ``preact-resnet18`` is bdjax's ``preact-resnet18-backdoorbench``. PyTorch's MobileNetV2 is
    torchvision's: ``mobilenet-v2`` is read as ``mobilenet-v2-torchvision``.
    """
    if name in ("preact-resnet18", BACKDOORBENCH_PREACT):
        return "preact-resnet18" if "bn.weight" in set(keys) else BACKDOORBENCH_PREACT
    if name == "mobilenet-v2":
        return "mobilenet-v2-torchvision"
    if name not in TORCH_MODELS:
        raise TorchInteropError(f"no PyTorch layout for model {name!r}; supported: {', '.join(TORCH_MODELS)}")
    return name


# Why a file asked for as one bdjax model is read as another.
VARIANT_NOTES = {
    BACKDOORBENCH_PREACT: "BackdoorBench's PreActResNet18 has no BN-ReLU before pooling, unlike bdjax's "
                          "preact-resnet18",
    "mobilenet-v2-torchvision": "PyTorch's MobileNetV2 is torchvision's (stride-2 stem, no expansion conv in "
                                "the first block, no shortcut convs), not bdjax's CIFAR port mobilenet-v2",
}


# --------------------------------------------------------------------------- normalisation

def parse_normalization(text: str, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """``(mean, std, description)`` from ``cifar10`` | ``cifar100`` | ``gtsrb`` (BackdoorBench's
    values) | ``none`` | ``MEAN,STD`` (each one number or ``channels`` numbers joined by '/')."""
    text = text.strip()
    if text in BACKDOORBENCH_NORMALIZATION:
        mean, std = BACKDOORBENCH_NORMALIZATION[text]
        return mean, std, f"BackdoorBench's {text} normalisation"
    if text == "none":
        return (0.0,) * channels, (1.0,) * channels, "none (the model took [0, 1] pixels)"
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = ([float(v) for v in part.split("/")] for part in parts)
    except ValueError:
        raise TorchInteropError(f"--normalize {text!r}: expected {', '.join(BACKDOORBENCH_NORMALIZATION)}, none, "
                                "or MEAN,STD (e.g. 0.5,0.5 or 0.49/0.48/0.45,0.25/0.24/0.26)") from None
    mean, std = (tuple(v * channels if len(v) == 1 else v) for v in (mean, std))
    if len(mean) != channels or len(std) != channels:
        raise TorchInteropError(f"--normalize {text!r}: needs 1 or {channels} means and stds")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise TorchInteropError(f"--normalize {text!r}: means must be finite and stds finite and > 0")
    return tuple(mean), tuple(std), f"given: mean {list(mean)}, std {list(std)}"


def with_normalization(info: DatasetInfo, mean, std) -> DatasetInfo:
    """``info`` whose models normalise [0, 1] inputs with ``mean`` / ``std``: a PyTorch model fed
    ``(x - mean) / std`` gives the same logits as the bdjax model fed ``x`` (exactly, borders
    included, which folding the statistics into the first conv could not do under zero padding)."""
    return dataclasses.replace(info, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


# --------------------------------------------------------------------------- files

@dataclasses.dataclass
class TorchFile:
    """What a PyTorch file held: the state_dict, and BackdoorBench's metadata if it had any."""

    state_dict: dict
    format: str  # "state_dict" or "backdoorbench-attack-result"
    metadata: dict  # BackdoorBench's model_name, num_classes, clean_data, img_size, when present
    keys_used: list[str]
    keys_ignored: list[str]
    sha256: str


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return torch


def load_file(path) -> TorchFile:
    """Read a PyTorch file with ``torch.load(weights_only=True)`` (no code from it runs).

    A raw ``state_dict`` (``DataParallel``'s ``module.`` prefix dropped), or BackdoorBench's
    attack result: a dict with the model's state_dict under ``model`` and its ``model_name``,
    ``num_classes``, ``clean_data`` (dataset) and ``img_size``.
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    payload = path.read_bytes()
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        forbidden = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if forbidden:  # a pickled object whose loading would call code: the allow-list refused it
            raise TorchInteropError(
                f"{path} holds Python objects that weights-only loading refuses ({forbidden[0]}); bdjax never "
                "runs code from a file: in a trusted environment, save just the tensors with "
                "torch.save(model.state_dict(), FILE)") from None
        raise TorchInteropError(f"{path} is not a readable PyTorch file (corrupt or truncated?): "
                                f"{_detail(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise TorchInteropError(f"{path} is not a readable PyTorch file (corrupt or truncated?): "
                                f"{_detail(err)}") from None
    sha256 = hashlib.sha256(payload).hexdigest()
    if not isinstance(content, dict):
        raise TorchInteropError(f"{path} holds a {type(content).__name__}, not a state_dict (a dict of tensors) "
                                "nor BackdoorBench's attack result (a dict with the state_dict under 'model')")
    if isinstance(content.get("model"), dict):
        metadata_keys = [k for k in ("model_name", "num_classes", "clean_data", "img_size") if k in content]
        state_dict = _strip_prefix(content["model"])
        _check_tensors(path, state_dict)
        return TorchFile(state_dict, "backdoorbench-attack-result", {k: content[k] for k in metadata_keys},
                         ["model", *metadata_keys], sorted(set(map(str, content)) - {"model", *metadata_keys}), sha256)
    state_dict = _strip_prefix(content)
    _check_tensors(path, state_dict)
    return TorchFile(state_dict, "state_dict", {}, ["(the whole file: a state_dict)"], [], sha256)


def _detail(err) -> str:
    """The informative line of torch's error (its weights-only errors open with a long preamble)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return (useful or lines or [type(err).__name__])[0]


def _numpy_data_globals():
    """NumPy's array reconstruction (data, no code): BackdoorBench's attack results store arrays."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint8)),
            type(np.dtype(np.int64)), type(np.dtype(np.float32)), type(np.dtype(np.float64))]


def _strip_prefix(state_dict: dict) -> dict:
    keys = list(state_dict)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


def _check_tensors(path, state_dict: dict):
    bad = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not hasattr(v, "detach")]
    if not state_dict or bad:
        raise TorchInteropError(f"{path} is not a state_dict: " + (
            "it is empty" if not state_dict else f"{len(bad)} entr(y/ies) are not named tensors, e.g. {_few(bad, 3)}"))


def save_state_dict(path, state_dict: dict[str, np.ndarray]) -> Path:
    """Write NumPy arrays as a PyTorch state_dict (``torch.save``) loadable with weights_only."""
    torch = _import_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in state_dict.items()}, path)
    return path


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFOS:
        raise TorchInteropError(f"unknown dataset {name!r}; known: {', '.join(sorted(INFOS))}")
    return INFOS[name]
