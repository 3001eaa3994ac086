"""Neural Cleanse, fine-pruning and ANP before / after matching their reference code (issue 31, item 3).

    BDJAX_DATA_DIR=/work/shared/data python experiments/baseline_fidelity.py --phase before
    BDJAX_DATA_DIR=/work/shared/data python experiments/baseline_fidelity.py --phase after

"after" runs the registered defenses with their defaults, which follow the reference code;
"before" with bdjax's old conventions, selected by the config switches that keep them
(``OLD_CONVENTIONS``). Both get the same compute budget (``overrides_for``), on the zoo v2
GTSRB ResNet-20 BadNets model (2x2 upper-left, target 14). Each phase stores its rows in
``results/baseline_fidelity.json`` beside the other phase's, with the commit it ran at, after
every method; the Markdown table ``results/baseline_fidelity.md`` is rewritten from the JSON
(``--table`` only does that). The defender's clean set is ``--clean-per-class`` test images per
class (``bdjax.runs.split_for_defense``); ACC / ASR are on ``--eval-limit`` other test images
(ASR over non-target images). No choice here looks at these evaluation numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint, defenses
from bdjax.evaluation import evaluate_model
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)

HERE = Path(__file__).resolve().parent
RUN = HERE / "zoo-v2" / "resnet20-gtsrb-badnets"
RESULTS = HERE / "results" / "baseline_fidelity"


# "before": bdjax's conventions until issue 31's item 3, through the config switches that keep them.
OLD_CONVENTIONS = {
    "nc": {"median": "midpoint", "reverse": {"schedule": "step", "init": "small"}},
    "fp": {"layer": "last_conv", "relative_drop": False},
    "anp": {"clip_noise": True, "exact_batch_variance": False},
}


def overrides_for(method: str, args) -> dict:
    """The compute budget, identical in both phases (NC: ``--nc-epochs`` epochs of the reference
    schedule, or as many steps of the old one), plus the old conventions for "before"."""
    steps = args.nc_epochs * -(-args.clean_size // 32)  # batch 32, the default of both
    budget = {"nc": {"reverse": {"epochs": args.nc_epochs} if args.phase == "after" else {"steps": steps}},
              "fp": {}, "anp": {"iterations": args.anp_iterations}}[method]
    if args.phase == "after":
        return budget
    old = OLD_CONVENTIONS[method]
    if method == "nc":
        return {**old, "reverse": {**old["reverse"], **budget["reverse"]}}
    return {**old, **budget}


def found(method: str, info: dict, target: int) -> dict:
    """What each method reports beside ACC / ASR."""
    if method == "nc":
        norms = np.asarray(info["norms"])
        return {"anomaly_index_target": float(info["anomaly_index"][target]),
                "flagged": [int(t) for t in info["infected"]], "smallest_mask": int(np.argmin(norms)),
                "norm_target": float(norms[target]), "norm_median": float(np.median(norms))}
    if method == "fp":
        return {"pruned_count": int(info["pruned_count"]), "unit": str(info["unit"])}
    return {"pruned_count": int(info["pruned_count"]), "threshold": float(info["threshold"])}


def save(args, part: dict):
    """Merge this phase's rows into the JSON record (the other phase may be running meanwhile)."""
    path = RESULTS.with_suffix(".json")
    record = json.loads(path.read_text()) if path.exists() else {}
    old = record.get(args.phase)
    if old and old.get("clean_size") == part["clean_size"] and old.get("seed") == part["seed"]:
        part = {**part, "rows": {**old["rows"], **part["rows"]}}  # a rerun of some methods keeps the others
    record[args.phase] = part
    path.write_text(json.dumps(record, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(table(record))
    return record


def run_phase(args) -> dict:
    at = tables.commit("../bdjax/defenses")  # before the (minutes-long) runs, so later edits of the tree do not change it
    run = checkpoint.load(RUN)
    target = int(run.target.target)
    clean, sets = split_for_defense(run, args.clean_per_class, args.seed, args.data_dir, args.eval_limit)
    args.clean_size = len(clean)
    none = evaluate_model(run.module, run.variables, sets)
    rows = {"none": {"acc": none.acc, "asr": none.asr}}
    part = {"commit": at, "conventions": "reference" if args.phase == "after" else "old (config switches)",
            "clean_size": len(clean), "eval_size": args.eval_limit, "seed": args.seed, "rows": rows}
    for method in args.methods:
        spec = defenses.get(method)
        overrides = overrides_for(method, args)
        config = defenses.make_config(spec.config_cls, overrides)
        started = time.perf_counter()
        result = spec.fn(run.module, run.variables, clean, jax.random.key(args.seed), config)
        jax.block_until_ready(result.variables)
        seconds = time.perf_counter() - started
        after = evaluate_model(run.module, result.variables, sets)
        rows[method] = {"acc": after.acc, "asr": after.asr, "seconds": round(seconds, 1), "overrides": overrides,
                        **found(method, result.info, target)}
        print(method, json.dumps(rows[method]), flush=True)
        save(args, part)
    return part


def table(record: dict) -> str:
    lines = ["# Baselines before / after matching their reference code (issue 31, item 3)", "",
             (f"Model `{RUN.relative_to(HERE.parent)}` (GTSRB ResNet-20, BadNets 2x2 upper-left, target 14). "
              "Regenerate: `BDJAX_DATA_DIR=... python experiments/baseline_fidelity.py --phase before` and "
              "`--phase after`. *before*: bdjax's old conventions through the config switches that keep "
              f"them ({json.dumps(OLD_CONVENTIONS)}); *after*: the defaults, which follow the reference code. "
              "Same compute budget in both (the `overrides` of each row in the JSON): NC 5 search epochs of 14 "
              "batches of 32 (its default 10) or as many steps; ANP 200 mask iterations (its default 2000). "
              "ASR over non-target images."), "",
             "| method | phase | commit | clean set | eval | found | ACC | ASR | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in ("none", "nc", "fp", "anp"):
        for phase in ("before", "after"):
            part = record.get(phase)
            if not part or method not in part["rows"]:
                continue
            row = part["rows"][method]
            if method == "nc":
                what = (f"index(14) {row['anomaly_index_target']:.2f}, flagged {row['flagged']}, "
                        f"smallest {row['smallest_mask']}")
            elif method == "fp":
                what = f"{row['pruned_count']} pruned ({row['unit']})"
            elif method == "anp":
                what = f"{row['pruned_count']} pruned (threshold {row['threshold']:.2f})"
            else:
                what = "–"
            lines.append(f"| {method} | {phase} | {part['commit']} | {part['clean_size']} | {part['eval_size']} | "
                         f"{what} | {100 * row['acc']:.2f} | {100 * row['asr']:.2f} | {row.get('seconds', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("before", "after"), required=True)
    parser.add_argument("--methods", nargs="+", default=["nc", "fp", "anp"], choices=("nc", "fp", "anp"))
    parser.add_argument("--clean-per-class", type=int, default=10, help="430 images, 3.4%% of GTSRB's test split")
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nc-epochs", type=int, default=5, help="NC search epochs (its default 10)")
    parser.add_argument("--anp-iterations", type=int, default=200, help="ANP mask iterations (its default 2000)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--table", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args(argv)
    if args.table:
        RESULTS.with_suffix(".md").write_text(table(json.loads(RESULTS.with_suffix(".json").read_text())))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    run_phase(args)
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
