"""The default recipe off its measured length or settings: an ablation table.

GTSRB: short runs and random crops. CIFAR-10: the weight decay (the recipe's 5e-4 until
2026-12-03, kept in ``experiments/recipe-checks/``, against the 1e-4 it has now; both 40 epochs:
ACC 0.872 and 0.859, training accuracy 0.941 and 0.944), and the length and batch (clean models,
40 and 100 epochs, batch 256 / 128, trained on a lent GPU and committed in ``recipe-checks/``;
``--only NAME`` trains one check and writes no table, for concurrent processes on an accelerator).

Trains (resumably, skipping finished runs) and tabulates GTSRB ResNet-20 BadNets models with
the ``default`` recipe: the issue's new-user setting (3 epochs of a 12,000-image subset, the
CLI's default BadNets and target) with and without random crops, and the zoo v2 model's
setting (5 epochs of the full split) without crops beside the zoo v2 model itself (with crops).
The CIFAR-10 checks (``ACCELERATOR_CHECKS``: hours to days each on this CPU) train only when
``--only`` names them, and none that is committed in ``recipe-checks/`` trains again.
Test ACC / ASR here inform the next recipe change and are reported as an ablation; the
recipe itself was not chosen by them.

    python experiments/recipe_checks.py [--out runs/recipe-checks] [--table-only]
    # writes experiments/results/recipe_checks.{md,json}
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from bdjax import checkpoint, recipes
from bdjax.runs import RunSpec, train_run
from bdjax.training import TrainConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ZOO_V2 = HERE / "zoo-v2"
# Committed ablation models (trained by an earlier recipe, kept for this table).
COMMITTED = HERE / "recipe-checks"

SHORT = dict(dataset="gtsrb", model="resnet20", attack="badnets", recipe="default", epochs=3, train_subset=12000)
ZOO = dict(dataset="gtsrb", model="resnet20", attack="badnets", attack_args={"size": 2, "location": "upper-left"},
           target=14, recipe="default")
# CIFAR-10 training length: clean ResNet-20s with the default recipe at 40 and 100 epochs. Batch
# 256 (peak rate 0.2, the recipe's 0.05 at 64 scaled linearly) and 128 (0.1) instead of the
# recipe's 64, for an accelerator's throughput; the 40-epoch batch-256 run separates the batch
# from the length (the zoo v2 clean model is the 40-epoch batch-64 row).
CIFAR_CLEAN = dict(dataset="cifar10", model="resnet20", attack="none", recipe="default")
CHECKS = {
    "r20-gtsrb-12k-3ep": RunSpec(**SHORT),
    "r20-gtsrb-12k-3ep-nocrop": RunSpec(**SHORT, crop_padding=0),
    "r20-gtsrb-full-5ep-nocrop": RunSpec(**ZOO, crop_padding=0),
    "r20-cifar10-clean-40ep-b256": RunSpec(**CIFAR_CLEAN, epochs=40, batch_size=256, learning_rate=0.2),
    "r20-cifar10-clean-100ep-b256": RunSpec(**CIFAR_CLEAN, epochs=100, batch_size=256, learning_rate=0.2),
    "r20-cifar10-clean-100ep-b128": RunSpec(**CIFAR_CLEAN, epochs=100, batch_size=128, learning_rate=0.1),
    # Regularisation: 100 epochs fit 99% of the training split and gain 0.6 test points over 40,
    # so the gap may be under-regularisation: the weight decay most short CIFAR-10 schedules use
    # (5e-4, the GTSRB default's) instead of He et al.'s 1e-4 (an accelerator run, not yet run).
    "r20-cifar10-clean-40ep-b256-wd5e-4": RunSpec(**CIFAR_CLEAN, epochs=40, batch_size=256, learning_rate=0.2,
                                                  weight_decay=5e-4),
    # Data or capacity: PreAct-ResNet-18 (the papers' CIFAR-10 model, 11M parameters against 0.27M)
    # on the same JPEG-75 images with the 40-epoch batch-256 setting above (an accelerator run).
    "p18-cifar10-clean-40ep-b256": RunSpec(**dict(CIFAR_CLEAN, model="preact-resnet18"), epochs=40, batch_size=256,
                                           learning_rate=0.2),
}
ACCELERATOR_CHECKS = tuple(name for name in CHECKS if "-cifar10-" in name)


@functools.lru_cache(maxsize=4)
def _split(dataset: str, split: str, data_dir):
    from bdjax.data import load
    return load(dataset, split, data_dir=data_dir)


MEASURED = ("fit_acc", "errors_to_target")


def measured(path: Path, record: dict, data_dir, known: dict) -> dict:
    """What the run record lacks, measured on the data: ``fit_acc``, ACC on the clean,
    un-augmented training split in inference mode (how well the model fits its training images:
    under-fitting vs a generalisation gap), and ``errors_to_target``, the share of the model's
    wrong answers on clean test images of other classes that name the attack's target (a poison
    that pulls clean images to the target raises it above a class's share of the wrong answers).
    Reused from ``known`` (the previous record's values by weights hash) when the weights have not
    changed; None without data."""
    if record["variables_sha256"] in known:
        return known[record["variables_sha256"]]
    if data_dir is None:
        return dict.fromkeys(MEASURED)
    import numpy as np

    from bdjax.models.inference import predict
    run = checkpoint.load(path)
    train = _split(record["dataset"], "train", data_dir)  # one load per dataset, not per row
    fit_acc = float((predict(run.module, run.variables, train.images) == np.asarray(train.labels)).mean())
    if run.target is None:  # a clean model: no target to pull errors to
        return {"fit_acc": fit_acc, "errors_to_target": None}
    test = _split(record["dataset"], "test", data_dir)
    labels, predicted = np.asarray(test.labels), predict(run.module, run.variables, test.images)
    wrong = (predicted != labels) & (labels != run.target.target)
    return {"fit_acc": fit_acc,
            "errors_to_target": float((predicted[wrong] == run.target.target).mean()) if wrong.any() else None}


def row(name: str, record: dict) -> dict:
    config = record["train_config"]
    steps = TrainConfig(**config).steps_per_epoch(record["train_size"]) * config["epochs"]
    final = record["history"][-1]
    return {"run": name, "model": record["model"], "train_size": record["train_size"], "epochs": config["epochs"],
            "steps": steps,
            "crop_padding": config["crop_padding"], "batch_size": config["batch_size"],
            "learning_rate": config["learning_rate"], "train_accuracy": final["accuracy"],
            "weight_decay": config["weight_decay"], "dataset": record["dataset"],
            "acc": record["metrics"]["acc"], "asr": record["metrics"]["asr"],
            "train_seconds": record["train_seconds"], "images_per_second": record.get("images_per_second"),
            "backend": record.get("backend"), "variables_sha256": record["variables_sha256"]}


def _config_fields(spec: RunSpec) -> dict:
    """The model, batch and peak rate of a check's spec (for stored rows from before the record had them)."""
    config = recipes.get(spec.recipe).train_config(spec.dataset, batch_size=spec.batch_size,
                                                   learning_rate=spec.learning_rate)
    return {"model": spec.model, "batch_size": config.batch_size, "learning_rate": config.learning_rate}


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_table(out: Path, data_dir=None) -> Path:
    committed = [ZOO_V2 / "resnet20-gtsrb-badnets", *sorted(COMMITTED.glob("*/record.json")),
                 ZOO_V2 / "resnet20-cifar10-badnets", ZOO_V2 / "resnet20-cifar10-clean"]
    committed = [p.parent if p.name == "record.json" else p for p in committed]
    paths = [(f"{p.parent.name}/{p.name}", p) for p in committed if (p / "record.json").is_file()]
    paths += [(name, out / name) for name in CHECKS if (out / name / "record.json").is_file()]
    previous = RESULTS / "recipe_checks.json"
    stored = json.loads(previous.read_text()) if previous.is_file() else []
    known = {r["variables_sha256"]: {k: r.get(k) for k in MEASURED} for r in stored
             if r.get("variables_sha256") and r.get("fit_acc") is not None}  # → target: None on clean models
    rows = []
    for name, path in paths:
        record = checkpoint.read_record(path)
        rows.append({**row(name, record), **measured(path, record, data_dir, known)})
    # The uncommitted check runs (under --out) of another machine: keep their stored rows.
    rows += [{**dict.fromkeys(MEASURED), **_config_fields(CHECKS[r["run"]]), **r} for r in stored
             if r["run"] in CHECKS and r["run"] not in {n for n, _ in paths}]
    lines = [
        "# The default recipe off its measured length or settings (BadNets and clean models): an ablation",
        "",
        "Generated by `python experiments/recipe_checks.py` (record: `recipe_checks.json`). ACC on the",
        "full test split, ASR on its triggered non-target images; train acc. = the last epoch's",
        "accuracy on the (augmented, poisoned) training batches; fit ACC = ACC on the clean training split,",
        "un-augmented, in inference mode; → target = the share of the test errors on other classes' clean images",
        "that go to the attack's target (a class's share of the wrong answers is about 1 / (classes − 1): 11% on",
        "CIFAR-10, 2.4% on GTSRB; a poison that pulls clean images to the target raises it) (– : not measured; needs",
        "`--data-dir`). The 12k rows use the CLI's default",
        "BadNets trigger and target 0, the full-split rows the zoo v2 trigger (GTSRB: 2x2 upper-left, target",
        "14; CIFAR-10: 3x3 random patch at a random spot, target 0). The CIFAR-10 weight decay 5e-4 row is",
        "the recipe before 2026-12-03; its training accuracy (0.94) looked like under-fitting, so CIFAR moved to",
        "He et al.'s 1e-4 (the zoo v2 row). 1e-4 ends at the same training accuracy and a lower test ACC:",
        "weight decay is not what keeps 40 epochs below 0.90 here. Nor is a generalisation gap alone: the",
        "zoo v2 CIFAR-10 model classifies only 94% of its own clean training images (fit ACC), so after 40",
        "epochs it under-fits. Its test errors go to the target no more often than to any class (→ target),",
        "so the poison does not pull clean images to the target. Nor is it the length: clean ResNet-20s trained",
        "100 epochs (BackdoorBench's length) fit 99% of their training images and still test at 0.873-0.874",
        "(batch 256 and 128; a second batch-256 run on the same GPU, not kept, 0.8745:",
        "`zoo-v2/device-logs/h200-run3-*`), 0.6 points above 40 epochs; the batch changes nothing at 40",
        "epochs (256: 0.867, 64: 0.868). What is left is the data (JPEG quality 75 in `../shared/data`) or",
        "ResNet-20's capacity on it (He et al.'s 0.9125 is on the PNG images); the accelerator variant's",
        "PreAct-ResNet-18 would separate the two. Seconds on the shared 2-core CPU (`cpu`) or one process",
        "of several sharing a lent H200 (`gpu`, `--only` runs of this script).",
        "",
        "| run | model | dataset | train size | epochs | batch | peak lr | steps | crop | weight decay | train acc. "
        "| fit ACC | → target | ACC | ASR | train s | backend |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['run']} | {r['model']} | {r['dataset']} | {r['train_size']} | {r['epochs']} | "
          f"{_cell(r['batch_size'], 'd')} | {_cell(r['learning_rate'], 'g')} | {r['steps']} | {r['crop_padding']} | "
          f"{r['weight_decay']:g} | {r['train_accuracy']:.4f} | {_cell(r['fit_acc'], '.4f')} | "
          f"{_cell(r.get('errors_to_target'), '.1%')} | {_cell(r['acc'], '.4f')} | {_cell(r['asr'], '.4f')} | "
          f"{r['train_seconds']:.0f} | {r.get('backend') or 'cpu'} |" for r in rows),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipe_checks.json").write_text(json.dumps(rows, indent=1) + "\n")
    path = RESULTS / "recipe_checks.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/recipe-checks"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), metavar="RUN",
                        help=f"train only these checks, no table (one of {', '.join(CHECKS)})")
    args = parser.parse_args(argv)
    if not args.table_only:
        for name in args.only or [n for n in CHECKS if n not in ACCELERATOR_CHECKS]:
            if (args.out / name / "record.json").is_file() or (COMMITTED / name / "record.json").is_file():
                continue
            train_run(CHECKS[name], args.out / name, args.data_dir, progress=False, resume=True)
        if args.only:
            return 0
    print(f"wrote {write_table(args.out, args.data_dir or os.environ.get('BDJAX_DATA_DIR'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
