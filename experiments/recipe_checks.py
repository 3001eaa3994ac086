"""The default recipe off its measured length or settings: an ablation table.

GTSRB: short runs and random crops. CIFAR-10: the weight decay (the recipe's 5e-4 until
2026-12-03, kept in ``experiments/recipe-checks/``, against the 1e-4 it has now; both 40 epochs:
ACC 0.872 and 0.859, training accuracy 0.941 and 0.944).

Trains (resumably, skipping finished runs) and tabulates GTSRB ResNet-20 BadNets models with
the ``default`` recipe: the issue's new-user setting (3 epochs of a 12,000-image subset, the
CLI's default BadNets and target) with and without random crops, and the zoo v2 model's
setting (5 epochs of the full split) without crops beside the zoo v2 model itself (with crops).
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

from bdjax import checkpoint
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
CHECKS = {
    "r20-gtsrb-12k-3ep": RunSpec(**SHORT),
    "r20-gtsrb-12k-3ep-nocrop": RunSpec(**SHORT, crop_padding=0),
    "r20-gtsrb-full-5ep-nocrop": RunSpec(**ZOO, crop_padding=0),
}


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
    test = _split(record["dataset"], "test", data_dir)
    labels, predicted = np.asarray(test.labels), predict(run.module, run.variables, test.images)
    wrong = (predicted != labels) & (labels != run.target.target)
    return {"fit_acc": float((predict(run.module, run.variables, train.images) == np.asarray(train.labels)).mean()),
            "errors_to_target": float((predicted[wrong] == run.target.target).mean()) if wrong.any() else None}


def row(name: str, record: dict) -> dict:
    config = record["train_config"]
    steps = TrainConfig(**config).steps_per_epoch(record["train_size"]) * config["epochs"]
    final = record["history"][-1]
    return {"run": name, "train_size": record["train_size"], "epochs": config["epochs"], "steps": steps,
            "crop_padding": config["crop_padding"], "train_accuracy": final["accuracy"],
            "weight_decay": config["weight_decay"], "dataset": record["dataset"],
            "acc": record["metrics"]["acc"], "asr": record["metrics"]["asr"],
            "train_seconds": record["train_seconds"], "images_per_second": record.get("images_per_second"),
            "variables_sha256": record["variables_sha256"]}


def write_table(out: Path, data_dir=None) -> Path:
    committed = [ZOO_V2 / "resnet20-gtsrb-badnets", *sorted(COMMITTED.glob("*/record.json")),
                 ZOO_V2 / "resnet20-cifar10-badnets"]
    committed = [p.parent if p.name == "record.json" else p for p in committed]
    paths = [(f"{p.parent.name}/{p.name}", p) for p in committed if (p / "record.json").is_file()]
    paths += [(name, out / name) for name in CHECKS if (out / name / "record.json").is_file()]
    previous = RESULTS / "recipe_checks.json"
    stored = json.loads(previous.read_text()) if previous.is_file() else []
    known = {r["variables_sha256"]: {k: r.get(k) for k in MEASURED} for r in stored
             if r.get("variables_sha256") and all(r.get(k) is not None for k in MEASURED)}
    rows = []
    for name, path in paths:
        record = checkpoint.read_record(path)
        rows.append({**row(name, record), **measured(path, record, data_dir, known)})
    # The uncommitted check runs (under --out) of another machine: keep their stored rows.
    rows += [{**dict.fromkeys(MEASURED), **r} for r in stored
             if r["run"] in CHECKS and r["run"] not in {n for n, _ in paths}]
    lines = [
        "# The default recipe off its measured length or settings (ResNet-20, BadNets): an ablation",
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
        "so the poison does not pull clean images to the target; what is left to separate is training",
        "length (100 epochs) from the data (JPEG quality 75 in `../shared/data`).",
        "Seconds on the shared 2-core CPU.",
        "",
        "| run | dataset | train size | epochs | steps | crop | weight decay | train acc. | fit ACC | → target | ACC | ASR "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['run']} | {r['dataset']} | {r['train_size']} | {r['epochs']} | {r['steps']} | {r['crop_padding']} | "
          f"{r['weight_decay']:g} | {r['train_accuracy']:.4f} | "
          f"{'–' if r['fit_acc'] is None else format(r['fit_acc'], '.4f')} | "
          f"{'–' if r.get('errors_to_target') is None else format(r['errors_to_target'], '.1%')} | "
          f"{r['acc']:.4f} | {r['asr']:.4f} | {r['train_seconds']:.0f} |" for r in rows),
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
    args = parser.parse_args(argv)
    if not args.table_only:
        for name, spec in CHECKS.items():
            if (args.out / name / "record.json").is_file():
                continue
            train_run(spec, args.out / name, args.data_dir, progress=False, resume=True)
    print(f"wrote {write_table(args.out, args.data_dir or os.environ.get('BDJAX_DATA_DIR'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
