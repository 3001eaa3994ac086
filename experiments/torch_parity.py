"""Parity of imported PyTorch models: the table of max |logit difference| and argmax agreement.

For every architecture ``bdjax import-torch`` reads: a PyTorch module
(``bdjax.interop.torch_models``) with random weights and non-trivial BatchNorm statistics,
saved with ``torch.save``, read back through ``bdjax.interop.torch.load_file`` and imported with
BackdoorBench's CIFAR-10 normalisation folded in; PyTorch (eval mode) on the normalised
images vs bdjax on the same images in [0, 1]. Then the round trip: bdjax's variables exported
to a state_dict, loaded strictly into a fresh PyTorch module, logits compared with the first.

    .venv/bin/python experiments/torch_parity.py   # writes experiments/results/torch_parity.{md,json}
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bdjax import models
from bdjax.data.dataset import CIFAR10
from bdjax.interop import torch as interop
from bdjax.interop.torch_models import build, randomize_batch_norm

# bdjax model -> the PyTorch architecture it is read from.
ARCHITECTURES = {
    "preact-resnet18-backdoorbench": "BackdoorBench PreActResNet18",
    "preact-resnet18": "PreActResNet18 with the final BN-ReLU",
    "resnet18": "CIFAR ResNet-18 (projection shortcuts)",
    "resnet20": "CIFAR ResNet-20 (zero-padding shortcuts)",
    "vgg11-bn": "torchvision VGG-11-BN, CIFAR head",
    "vgg16-bn": "torchvision VGG-16-BN, CIFAR head",
    "mobilenet-v2-torchvision": "torchvision MobileNetV2",
}
NUM_IMAGES = 64
TOLERANCE = 1e-4
RESULTS = Path(__file__).parent / "results"


def torch_logits(net, images: np.ndarray, mean, std) -> np.ndarray:
    """Eval-mode logits of ``net`` on ``(images - mean) / std``. images: f32[N, H, W, C] in [0, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return net.eval()(x).numpy()


def parity(name: str, images: np.ndarray, seed: int, folder: Path) -> dict:
    mean, std, how = interop.parse_normalization("cifar10")
    torch.manual_seed(seed)  # the weights build() draws
    net = randomize_batch_norm(build(name, CIFAR10.num_classes), torch.Generator().manual_seed(seed))
    reference = torch_logits(net, images, mean, std)
    path = folder / f"{name}.pt"
    torch.save(net.state_dict(), path)
    started = time.perf_counter()
    loaded = interop.load_file(path)
    model = interop.resolve_model(name, loaded.state_dict)
    module = models.create(model, interop.with_normalization(CIFAR10, mean, std))
    variables = interop.from_state_dict(loaded.state_dict, module, CIFAR10.image_shape, model_name=model)
    logits = models.batched_logits(module, variables, images)
    seconds = time.perf_counter() - started

    fresh = build(model, CIFAR10.num_classes)
    state = interop.to_state_dict(module, variables, CIFAR10.image_shape)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    round_trip = torch_logits(fresh, images, mean, std)
    return {"architecture": ARCHITECTURES[name], "bdjax_model": model, "tensors": len(loaded.state_dict),
            "max_abs_logit": float(np.abs(reference).max()),
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "round_trip_max_abs_logit_diff": float(np.abs(round_trip - reference).max()),
            "import_seconds": seconds, "normalization": how}


def table(rows: list[dict]) -> str:
    lines = ["| PyTorch architecture | bdjax model | max abs logit | max abs logit diff | argmax agreement | "
             "round trip to PyTorch: max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['bdjax_model']} | {r['max_abs_logit']:.3f} | "
                     f"{r['max_abs_logit_diff']:.2e} | {r['argmax_agreement']:.3f} | "
                     f"{r['round_trip_max_abs_logit_diff']:.2e} |")
    return "\n".join(lines)


def main():
    images = np.random.default_rng(0).random((NUM_IMAGES, *CIFAR10.image_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        rows = [parity(name, images, seed, Path(folder)) for seed, name in enumerate(ARCHITECTURES)]
    RESULTS.mkdir(exist_ok=True)
    record = {"images": NUM_IMAGES, "image_distribution": "uniform [0, 1), numpy seed 0", "classes": 10,
              "normalization": rows[0]["normalization"], "tolerance": TOLERANCE, "torch": torch.__version__,
              "machine": platform.machine(), "rows": rows,
              "all_within_tolerance": all(r["max_abs_logit_diff"] <= TOLERANCE for r in rows)}
    (RESULTS / "torch_parity.json").write_text(json.dumps(record, indent=1) + "\n")
    text = table(rows)
    (RESULTS / "torch_parity.md").write_text(
        "# PyTorch import parity\n\n"
        f"{NUM_IMAGES} uniform random 32x32 images, CIFAR-10 heads (10 classes), PyTorch modules from "
        "`bdjax.interop.torch_models` with random weights and random BatchNorm statistics, eval mode; "
        f"inputs normalised with {rows[0]['normalization']} on the PyTorch side, folded into the bdjax "
        f"model. Written by `experiments/torch_parity.py` (torch {torch.__version__}).\n\n{text}\n")
    print(text)
    if not record["all_within_tolerance"]:
        raise SystemExit(f"some architecture exceeds max |logit diff| {TOLERANCE}")


if __name__ == "__main__":
    main()
