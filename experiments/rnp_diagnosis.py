"""Why RNP destroys the zoo v2 GTSRB ResNet-20s (issue 31 item 5): a diagnosis, not a result.

    python experiments/rnp_diagnosis.py                                  # BadNets, seed 0
    python experiments/rnp_diagnosis.py --runs resnet20-gtsrb-badnets resnet20-gtsrb-blended --seeds 0 1

For each unlearning target (RNP's 0.2 and lower ones) RNP unlearns and recovers its neuron masks
on the same defender's set as ``tsbd_tables.py`` (k = 15 test images per class, drawn per seed);
then the original model is pruned at several mask thresholds, RNP's 0.7 among them, and each is
evaluated on the rest of the test split. The thresholds are a sweep over TEST data: they show
whether any threshold separates the backdoor neurons from the clean ones, and none of them may
be read as RNP's result (that is 0.7, in ``tsbd_tables.md``). Writes ``results/rnp_diagnosis.json``
(a killed run continues from it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bdjax.defenses import rnp
from bdjax.evaluation import evaluate_model
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)

THRESHOLDS = (0.7, 0.5, 0.3, 0.2, 0.1)
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def diagnose(run, name: str, k: int, seed: int, targets, record: tables.CellRecord, data_dir=None):
    """Every missing unlearning target of (``name``, ``k``, ``seed``), on one defense split."""
    todo = [t for t in targets if not record.find(run=name, k=k, seed=seed, unlearn_target=t)]
    if not todo:
        return
    clean, sets = split_for_defense(run, k, seed, data_dir)
    before = evaluate_model(run.module, run.variables, sets)
    for target in todo:
        started = time.perf_counter()
        config = rnp.RnpConfig(unlearn_max_accuracy=target)
        result = rnp.rnp(run.module, run.variables, clean, jax.random.key(seed), config)
        seconds = time.perf_counter() - started
        masks = result.info["masks"]
        values = np.concatenate([np.ravel(m) for m in masks.values()])
        sweep = []
        for threshold in THRESHOLDS:
            pruned_variables, pruned = rnp.prune_by_mask(run.module, run.variables, masks, threshold)
            after = evaluate_model(run.module, pruned_variables, sets)
            sweep.append({"threshold": threshold, "pruned": sum(map(len, pruned.values())),
                          "acc": after.acc, "asr": after.asr})
            print(f"{name} seed {seed} target {target}: threshold {threshold} prunes {sweep[-1]['pruned']} of "
                  f"{values.size}: ACC {after.acc:.3f} ASR {after.asr:.3f}", flush=True)
        record.add(dict(run=name, k=k, seed=seed, unlearn_target=target, defense_size=len(clean),
                        eval_size=len(sets.clean), neurons=int(values.size), unlearning=result.info["unlearning"],
                        mask_quantiles=dict(zip(map(str, QUANTILES), np.quantile(values, QUANTILES).tolist())),
                        before={"acc": before.acc, "asr": before.asr}, sweep=sweep, seconds=seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="*", default=["resnet20-gtsrb-badnets"], help="zoo v2 run names")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--k", type=int, default=15, help="clean test images per class (tsbd_tables' 5%%)")
    parser.add_argument("--unlearn-targets", nargs="*", type=float, default=[0.2, 0.05],
                        help="clean ACC at which unlearning stops (RNP's 0.2; GTSRB's chance is 0.023)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--record", default="rnp_diagnosis")
    args = parser.parse_args(argv)
    record = tables.CellRecord(tables.RESULTS / f"{args.record}.json", {"thresholds": list(THRESHOLDS)})
    for name in args.runs:
        run = tables.zoo_run("v2", name)
        for seed in args.seeds:
            diagnose(run, name, args.k, seed, args.unlearn_targets, record, args.data_dir)
    print(f"wrote {record.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
