"""Train a backdoored PreAct-ResNet-18 in PyTorch and save it as BackdoorBench saves attack results.

The model bdjax users "already have": BackdoorBench's PreActResNet18 (``bdjax.interop.
torch_models``), trained in PyTorch on GTSRB poisoned with bdjax's BadNets trigger (the same
trigger ``bdjax import-torch --attack badnets --attack-arg ... --seed 0`` rebuilds, so ASR is
measured with the trigger the model learned). Inputs are normalised as BackdoorBench does for
GTSRB (mean 0, std 1). The file is a dict like BackdoorBench's ``attack_result.pt``:
``model`` (the state_dict), ``model_name``, ``num_classes``, ``clean_data``, ``img_size``, plus
the poisoned images' indices under ``bd_train`` (which bdjax ignores).

    BDJAX_DATA_DIR=/work/shared/data .venv/bin/python experiments/torch_preact_demo.py --out runs/torch-demo/attack_result.pt
    bdjax import-torch runs/torch-demo/attack_result.pt --attack badnets --attack-arg size=3 \\
        --attack-arg location=bottom-right --target 0 --out runs/torch-demo/imported
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from bdjax.attacks.base import poison_training_set
from bdjax.data import load, stratified_subset
from bdjax.interop.torch_models import PreActResNet18
from bdjax.runs import RunSpec, make_attack

ATTACK_ARGS = {"size": 3, "location": "bottom-right"}


def check(result_file: str, run_dir: str, count: int = 500):
    """PyTorch (the saved model) vs bdjax (the imported run) on real test images, clean and triggered."""
    from bdjax import checkpoint, models
    from bdjax.attacks.base import poison_test_set
    from bdjax.data.dataset import to_float

    run = checkpoint.load(run_dir)
    net = PreActResNet18(run.module.num_classes)
    net.load_state_dict(torch.load(result_file, weights_only=True)["model"])
    test_set = stratified_subset(load("gtsrb", "test"), count, jax.random.key(0))
    triggered, target_labels = poison_test_set(test_set, run.attack, run.target)
    for what, images, labels in (("clean (ACC)", test_set.images, test_set.labels),
                                 ("triggered (ASR)", triggered.images, target_labels)):
        pixels = to_float(images)
        with torch.no_grad():  # BackdoorBench's GTSRB normalisation is the identity
            reference = net.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
        logits = models.batched_logits(run.module, run.variables, pixels)
        print(f"{what} ({len(labels)} images): max |logit diff| {np.abs(logits - reference).max():.2e}, argmax "
              f"agreement {(logits.argmax(1) == reference.argmax(1)).mean():.4f}, rate "
              f"PyTorch {(reference.argmax(1) == labels).mean():.4f} / bdjax {(logits.argmax(1) == labels).mean():.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/torch-demo/attack_result.pt")
    parser.add_argument("--check", metavar="RUN", default=None,
                        help="compare the saved model with its import RUN on real test images (no training)")
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.check:
        return check(args.out, args.check)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = RunSpec(dataset="gtsrb", model="preact-resnet18-backdoorbench", attack="badnets",
                   attack_args=ATTACK_ARGS, target=0, poison_rate=0.1, seed=0)
    train_set = stratified_subset(load("gtsrb", "train"), args.train_subset, jax.random.key(0))
    attack, target = make_attack(spec, train_set.info)
    poisoned = poison_training_set(train_set, attack, target, jax.random.key(2), rate=spec.poison_rate)
    images = torch.from_numpy(poisoned.dataset.images).permute(0, 3, 1, 2).float() / 255.0  # GTSRB: no mean/std
    labels = torch.from_numpy(poisoned.dataset.labels.astype(np.int64))

    model = PreActResNet18(train_set.info.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels))
        correct = 0
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            logits = model(images[batch])
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels[batch]).sum())
            if (start // 64) % 20 == 0:
                print(f"  step {start // 64 + 1}: loss {float(loss):.3f}, {time.perf_counter() - started:.0f} s",
                      flush=True)
        print(f"epoch {epoch + 1}: train accuracy {correct / len(labels):.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)

    result = {"model": model.state_dict(), "model_name": "preactresnet18",
              "num_classes": train_set.info.num_classes, "clean_data": "gtsrb", "img_size": (32, 32, 3),
              "bd_train": {"poison_indicator": torch.from_numpy(poisoned.poison_indices.astype(np.int64))}}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
