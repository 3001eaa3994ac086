"""Is CIFAR-10 ResNet-20's ACC ceiling bdjax's trainer or the data? The same recipe in plain PyTorch.

Zoo v2's CIFAR-10 ResNet-20s stop at ACC 0.86-0.87 (40 epochs) and 0.874 (100 epochs, 99% of
the training split fit), where He et al.'s ResNet-20 has 0.9125 on the original PNG images and
the shared data is JPEG quality 75. This trains the same architecture (``bdjax.interop.torch_models``,
whose forward pass equals bdjax's to 1e-5, ``experiments/torch_parity.py``) with a training loop
written here in PyTorch and nothing of bdjax's training code: torch.optim.SGD (Nesterov, momentum
0.9, coupled weight decay), linear warm-up then cosine per step (LambdaLR), torchvision-style random
crop (4 px zero padding) and horizontal flip, He-normal (fan-out) conv init as torchvision, the
dataset's channel normalisation, evaluation in eval mode on the full 10,000-image test split.
The default arguments are the recipe check ``r20-cifar10-clean-40ep-b256`` (bdjax: ACC 0.8669):
if PyTorch lands at the same ACC the ceiling is the setting (data, schedule), not bdjax's trainer.

``--jpeg-quality Q`` re-encodes every train and test image once more as JPEG at quality Q (PIL, 4:2:0
chroma subsampling as the shared files) before training: a dose-response check of how much ACC the
compression costs this recipe (the original PNG images are not available here to train on).

Resumable: the state (model, optimizer, schedule, RNG, epoch) is written atomically after
every epoch to ``--state`` and a rerun continues from it.

    pip install torch==2.13.0   # the CPU build; not a bdjax dependency
    python experiments/torch_reference_train.py [--depth 20] [--epochs 40] [--batch-size 256] [--lr 0.2] [--seed 0] \
        [--jpeg-quality Q] [--threads N]
    # writes experiments/results/torch_reference_train.{json,md} (one row per setting and seed)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bdjax.data import load
from bdjax.data.cifar import decode_jpegs
from bdjax.data.dataset import CIFAR10
from bdjax.interop.torch_models import CifarResNet

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "torch_reference_train"
MEAN = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding and a horizontal flip with probability 1/2, per image (NCHW)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    flips = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flips[:, None, None, None], cols.flip(3), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def he_init(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], channels-last memory."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def reencode(images: np.ndarray, quality: int) -> np.ndarray:
    """Each uint8 HWC image saved as JPEG at ``quality`` (4:2:0, as the shared files), decoded as bdjax decodes those."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=2)
        files.append(buffer.getvalue())
    offsets = np.cumsum([0] + [len(f) for f in files])
    return decode_jpegs(np.frombuffer(b"".join(files), np.uint8), offsets)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the peak signal-to-noise ratio (dB) between two uint8 image stacks."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(normalise(images[i:i + batch])).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(images), batch))
    return correct / len(images)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_set, test_set = load("cifar10", "train", args.data_dir), load("cifar10", "test", args.data_dir)
    train_images, test_images = np.asarray(train_set.images), np.asarray(test_set.images)
    data = {"data": "shared JPEG-75"}
    if args.jpeg_quality is not None:
        began = time.perf_counter()
        reencoded = reencode(train_images, args.jpeg_quality)
        data = {"data": f"shared JPEG-75 re-encoded at JPEG-{args.jpeg_quality}", "jpeg_quality": args.jpeg_quality,
                "psnr_to_shared_db": round(psnr(reencoded, train_images), 2)}
        train_images, test_images = reencoded, reencode(test_images, args.jpeg_quality)
        print(f"re-encoded at quality {args.jpeg_quality} in {time.perf_counter() - began:.0f} s, "
              f"PSNR to the shared images {data['psnr_to_shared_db']} dB", flush=True)
    x_train, y_train = to_tensor(train_images), torch.from_numpy(np.asarray(train_set.labels, np.int64))
    x_test, y_test = to_tensor(test_images), torch.from_numpy(np.asarray(test_set.labels, np.int64))
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch, as bdjax does
    total = steps_per_epoch * args.epochs
    warmup = max(int(total * args.warmup), 1)

    n = (args.depth - 2) // 6
    model = CifarResNet(10, (n, n, n), (16, 32, 64), "pad").to(memory_format=torch.channels_last)
    he_init(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    generator = torch.Generator().manual_seed(args.seed)
    history, start, seconds = [], 0, 0.0
    state_path = Path(args.state)
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        history, start, seconds = state["history"], state["epoch"], state["seconds"]
        print(f"resumed after epoch {start}", flush=True)

    for epoch in range(start, args.epochs):
        model.train()
        began = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        loss_sum = correct = 0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            images = normalise(augment(x_train[index], generator))
            logits = model(images)
            loss = F.cross_entropy(logits, y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == y_train[index]).sum())
        seconds += time.perf_counter() - began
        seen = steps_per_epoch * args.batch_size
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                        "seconds": round(seconds, 1)})
        print(json.dumps(history[-1]), flush=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "generator": generator.get_state(),
                 "history": history, "epoch": epoch + 1, "seconds": seconds}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)

    return {"setting": setting_name(args), "seed": args.seed, "model": f"resnet{args.depth}", "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.lr, "weight_decay": args.weight_decay, "warmup_fraction": args.warmup,
            **data, "acc": accuracy(model, x_test, y_test), "test_size": len(x_test),
            "final_train_accuracy": history[-1]["accuracy"], "train_seconds": round(seconds, 1),
            "images_per_second": round(seen * args.epochs / seconds, 1) if seconds else None,
            "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "history": history}


def setting_name(args) -> str:
    name = f"r{args.depth}-cifar10-clean-{args.epochs}ep-b{args.batch_size}-lr{args.lr:g}-wd{args.weight_decay:g}"
    return name if args.jpeg_quality is None else f"{name}-jpeg{args.jpeg_quality}"


def bdjax_twin(row: dict) -> tuple[str, dict] | None:
    """(name, record) of bdjax's clean CIFAR-10 model of the row's depth and recipe, if one is committed."""
    if row.get("jpeg_quality") is not None:  # bdjax trained only on the shared images
        return None
    here = Path(__file__).resolve().parent
    wanted = {"epochs": row["epochs"], "batch_size": row["batch_size"], "learning_rate": row["learning_rate"],
              "weight_decay": row["weight_decay"], "warmup_fraction": row["warmup_fraction"], "optimizer": "sgd",
              "nesterov": True, "schedule": "cosine", "crop_padding": 4}
    for path in sorted([*(here / "recipe-checks").glob("*/record.json"), here / "zoo-v2/resnet20-cifar10-clean/record.json"]):
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        config = record["train_config"]
        if (record["dataset"], record["model"], record["attack"]) == ("cifar10", row.get("model", "resnet20"), None) and all(
                config.get(k) == v for k, v in wanted.items()):
            return path.parent.name, record
    return None


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in rows:
        twin = bdjax_twin(row)
        if twin:
            name, record = twin
            ours = [h["accuracy"] for h in record["history"]]
            theirs = [h["accuracy"] for h in row["history"]]
            row["bdjax"] = {"run": name, "acc": record["metrics"]["acc"], "final_train_accuracy": ours[-1],
                            "max_train_accuracy_gap": max(abs(a - b) for a, b in zip(ours, theirs))}
    (RESULTS / f"{NAME}.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = ["# CIFAR-10 ResNets trained by a plain PyTorch loop (bdjax's recipe, the JPEG-75 data)", "",
             "Written by `experiments/torch_reference_train.py`. bdjax's run of the same recipe (a committed "
             "recipe check or zoo v2 model) beside it; \"max per-epoch train acc gap\" is the largest difference "
             "between the two per-epoch training accuracies (augmented batches, train mode). Rows with a "
             "`-jpegQ` setting train and test on the shared images re-encoded once more at JPEG quality Q "
             "(`--jpeg-quality Q`; PSNR to the shared images beside it): how much ACC further compression costs.", "",
             "| setting | seed | data | PyTorch ACC (10,000 test images) | PyTorch final train acc | bdjax run | "
             "bdjax ACC | bdjax final train acc | max per-epoch train acc gap | PyTorch images/s | PyTorch train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        twin = row.get("bdjax")
        ours = (f"{twin['run']} | {twin['acc']:.4f} | {twin['final_train_accuracy']:.4f} | "
                f"{twin['max_train_accuracy_gap']:.4f}") if twin else "none | | |"
        data = row.get("data", "shared JPEG-75")
        if "psnr_to_shared_db" in row:
            data += f" (PSNR {row['psnr_to_shared_db']} dB)"
        lines.append(f"| {row['setting']} | {row['seed']} | {data} | {row['acc']:.4f} | {row['final_train_accuracy']:.4f} | "
                     f"{ours} | {row['images_per_second']} | {row['train_seconds']} |")
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: $BDJAX_DATA_DIR")
    parser.add_argument("--depth", type=int, choices=(20, 32, 56), default=20,
                        help="CIFAR ResNet depth (56: capacity, at 3x ResNet-20's cost)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help="re-encode train and test images at this JPEG quality (1-95) before training")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--state", default=None, help="per-epoch state file (default runs/torch-reference/SETTING-sSEED.pt)")
    args = parser.parse_args()
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 95:
        parser.error(f"--jpeg-quality must be in 1..95 (PIL's useful range), got {args.jpeg_quality}")
    args.state = args.state or f"runs/torch-reference/{setting_name(args)}-s{args.seed}.pt"
    record = RESULTS / f"{NAME}.json"

    def recorded() -> list[dict]:
        return json.loads(record.read_text())["rows"] if record.exists() else []

    rows = recorded()
    if any(r["setting"] == setting_name(args) and r["seed"] == args.seed for r in rows):
        print(f"{setting_name(args)} seed {args.seed} is recorded; table rewritten")
    else:
        row = train(args)
        rows = recorded() + [row]  # read again: another setting may have finished while this one trained
    write(rows)
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "history"}))


if __name__ == "__main__":
    main()
