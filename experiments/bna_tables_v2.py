"""BNA's tables 1 / 3 / 9 on the zoo v2 CIFAR-10 ResNet-20s, with Neural Cleanse and I-BAU: JSON + Markdown.

    python experiments/bna_tables_v2.py                     # table 1: 100 clean images per class, seeds 0-2
    python experiments/bna_tables_v2.py --clean-per-class 10 --only resnet20-cifar10-badnets   # table 3
    python experiments/bna_tables_v2.py --methods bna --seeds 0 --search-steps 50   # a quick look
    python experiments/bna_tables_v2.py --record bna_tables_v2_gtsrb --clean-per-class 10 \
        --only resnet20-gtsrb-lf resnet20-gtsrb-ssba resnet20-gtsrb-input-aware --methods nc ibau
    python experiments/bna_tables_v2.py --record bna_tables_v2_gtsrb --clean-per-class 10 \
        --only resnet20-gtsrb-lf --methods bna --sources 1 2 3 --seeds 0   # GTSRB: 3 of 43 sources

Every model of ``MODELS`` that the zoo holds: all-to-one BadNets, all-to-all BadNets, CB, SP,
Blended (the paper's table 6 row), WaNet once trained, and the clean model (table 9: BNA's ACC
cost where there is no backdoor). Defense set: ``k`` clean test images per class drawn per seed
(table 1: 10% of the test set, k = 100; table 3: k = 10); ACC / ASR / SIA on the rest of the
test split (``--eval-limit N``: a stratified subset). BNA is measured with the paper's test-time
rule (an input that g_t sends away from a detected target t is flagged and keeps g_t's label):
ACC / ASR / SIA of that rule, the detector's TPR (triggered inputs flagged) and FPR (clean inputs
flagged, among those f sends to a detected target: the paper's table 8; and over all), the
detected targets and the top anomaly scores. The pair search covers every ordered class pair.
Per trigger type, as the paper does (sec. 5.1): the mask objective for patch triggers (BadNets,
the clean model), the additive perturbation for the others; the MAD threshold 7, 3 for WaNet
(appendix 8). ``--search-batch`` images per pair and step (10, ours: the paper does not give it,
chosen for CPU cost before any result). NC and I-BAU run at their library defaults on the same
clean set. The JSON keeps every finished cell, so a killed run continues; the paper's numbers
(ResNet-18, 91-93% ACC) are beside ours as context, never as measurements.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

from bdjax.defenses import bna

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)
from bna_tables import (CIFAR_BADNETS_T1, PAPER, PAPER_DETECTION,  # noqa: E402  (the paper's numbers, written once)
                        default_threshold, trigger_kind)

# CB last: at the paper's 2/255 it did not plant in zoo v2 (undefended ASR 0.02), so its row compares nothing.
MODELS = ("resnet20-cifar10-badnets", "resnet20-cifar10-badnets-a2a", "resnet20-cifar10-sp", "resnet20-cifar10-blended",
          "resnet20-cifar10-wanet", "resnet20-cifar10-clean", "resnet20-cifar10-cb")
# BNA's ACC cost on clean CIFAR-10 ResNet-18 models (table 9): no backdoor, so nothing should change.
PAPER_TABLE_9 = "ACC drop 0.0000-0.0009 (t.9)"
RECORD = "bna_tables_v2"
DATASET_NAMES = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB"}
_NUMBERS = re.compile(r"(\d\.\d+) / (\d\.\d+) / (\d\.\d+)")


def paper_row(cell: dict, method: str) -> str:
    """The paper's ACC / ASR / SIA string for a cell's model and ``method`` ("" if none)."""
    mode = "-a2a" if cell.get("target_mode") == "all_to_all" else ""
    rows = PAPER.get((cell["dataset"], cell["attack"] + mode), {})
    if (cell["dataset"], cell["attack"] + mode) == ("cifar10", "badnets") and cell["defense_size"] >= 1000:
        rows = CIFAR_BADNETS_T1  # 10% of the test set as defense set: table 1's setting, not table 3's
    return rows.get(method, "")


def paper_reference(cell: dict) -> dict | None:
    """The paper's row for a measured cell (for the results book's summary), or None."""
    row, none = _NUMBERS.match(paper_row(cell, cell["method"])), _NUMBERS.match(paper_row(cell, "none"))
    if row is None or none is None:
        return None
    table = re.search(r"t\.(\d+)", paper_row(cell, cell["method"]))
    return {"acc": float(row[1]), "asr": float(row[2]), "acc_before": float(none[1]), "dataset": "cifar10",
            "model": "resnet18", "source": f"Li et al. (BNA), table {table[1] if table else '?'} (CIFAR-10 ResNet-18)"}


def bna_overrides(attack: str, args) -> dict:
    sources = {} if args.sources is None else {"source_classes": tuple(args.sources), "align_all_sources": True}
    return {"threshold": args.threshold if args.threshold is not None else default_threshold(attack),
            "reverse": {"kind": trigger_kind(attack), "batch_size": args.search_batch,
                        **({"steps": args.search_steps} if args.search_steps else {})}, **sources}


def bna_label(sources) -> str:
    """BNA's row label: "bna" for the paper's search over every pair; with a source subset (a cost
    cut, not the paper's method) the sources are in the label, so the two never share a row."""
    return "bna" if sources is None else "bna-sources-" + "-".join(map(str, sources))


def evaluate_rule(run, registered: str, result, variables, sets) -> dict | None:
    """BNA's rows by the paper's test-time rule; other methods (None) by their repaired model's predictions."""
    if registered != "bna":
        return None
    detection = result.info["detection"]
    rule = bna.rule_rates(run.module, result.variables, result.info["aligned"], sets)  # a clean model: ACC only
    return {"targets": detection["targets"], "top_pairs": detection["top_pairs"][:3],
            "detect_seconds": result.info["detect_seconds"],
            **{k: (None if not np.isfinite(v) else float(v)) for k, v in rule.items()}}


def markdown(record: tables.CellRecord, command: str) -> str:
    rows = []
    groups = tables.group(record.cells, ("run", "k", "method"))
    first_seen = {}
    for name, k, _ in groups:
        first_seen.setdefault((name, k), len(first_seen))
    rank = {"none": 0, "bna": 1, "nc": 3, "ibau": 4}  # a source-subset BNA row (2) beside the full one
    for (name, k, method), cells in sorted(groups.items(), key=lambda item: (
            first_seen[item[0][:2]], rank.get(item[0][2], 2))):
        first = cells[0]
        detector = ""
        if method.startswith("bna"):
            found = [tuple(c["targets"]) for c in cells]
            rate = {key: tables.mean_std([c.get(key) for c in cells], count=False) for key in ("tpr", "fpr_target", "fpr_all")}
            detector = (f"targets {', '.join(str(list(t)) for t in found)}; TPR {rate['tpr']}%, "
                        f"FPR(target) {rate['fpr_target']}%, FPR(all) {rate['fpr_all']}%")
        elif method == "nc" and any("infected" in c.get("info", {}) for c in cells):
            # cells measured before 2026-12-05 did not keep the flagged labels: "?"
            detector = "flagged " + ", ".join(str(c["info"].get("infected", "?")) for c in cells)
        paper = paper_row(first, method) or (PAPER_TABLE_9 if first["attack"] == "none" and method == "bna" else "")
        if method == "bna" and first["attack"] != "none":
            paper += f"; {PAPER_DETECTION[first.get('target_mode', 'all_to_one')]}"
        seconds = [c["seconds"] for c in cells if c["seconds"] is not None]
        rows.append(f"| {name} | {first['defense_size']} | {method} | {tables.mean_std([c['acc'] for c in cells])} | "
                    f"{tables.mean_std([c['asr'] for c in cells], count=False)} | "
                    f"{tables.mean_std([c.get('sia') for c in cells], count=False)} | {detector} | "
                    f"{f'{np.mean(seconds):.0f}' if seconds else '–'} | {paper} |")
    eval_sizes = sorted({c["eval_size"] for c in record.cells})
    datasets = " and ".join(DATASET_NAMES.get(d, d) for d in sorted({c["dataset"] for c in record.cells})) or "CIFAR-10"
    return "\n".join([
        f"# BNA's tables 1 / 3 / 9 on zoo v2 ({datasets} ResNet-20), with Neural Cleanse and I-BAU",
        "",
        f"Generated by `{command}` from `{record.path.name}`. Defense set: k clean test images per class,",
        f"drawn per seed; ACC / ASR / SIA (%) on the rest of the test split ({', '.join(map(str, eval_sizes))}",
        "clean images), mean ± sample std over the seeds (n on the ACC column). BNA's rows use the paper's",
        "test-time rule; its detector columns list the targets detected per seed. Seconds: the defense call",
        "on the shared 2-core CPU, compile time included.",
        "",
        "**Paper column: Li et al.'s CIFAR-10 ResNet-18 numbers (ACC / ASR / SIA as fractions; table 1 with",
        "k = 100, table 3 with k = 10, table 6 for Blend, table 9 for clean models): reported, not measured here.**",
        *([] if not any(c["method"].startswith("bna-sources") for c in record.cells) else [
            "",
            "`bna-sources-S`: BNA's pair search from the source classes S only (every target each), aligned on the "
            "clean images of every class but the target: a cost cut (GTSRB's full search covers 1,806 pairs, ~13 h "
            "on this CPU), not the paper's method, so no paper number stands beside it."]),
        "",
        "| model | defense set | method | ACC % | ASR % | SIA % | detector | seconds | paper |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="zoo v2 run names (default: those of MODELS that exist)")
    parser.add_argument("--methods", nargs="*", default=["bna", "nc", "ibau"], choices=["bna", "nc", "ibau"])
    parser.add_argument("--clean-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-limit", type=int, default=None, help="default: the whole rest of the test split")
    parser.add_argument("--search-batch", type=int, default=10, help="clean images per pair and step in BNA's search")
    parser.add_argument("--search-steps", type=int, default=None, help="BNA's search steps (default: the library's)")
    parser.add_argument("--threshold", type=float, default=None, help="MAD threshold (default: 7; 3 for WaNet)")
    parser.add_argument("--sources", type=int, nargs="+", default=None,
                        help="BNA's pair search from these source classes only, aligned on every class but the "
                             "target (a cost cut for GTSRB's 1,806 pairs; its row is labelled bna-sources-...)")
    parser.add_argument("--record", default=RECORD, help="results/NAME.{json,md}")
    args = parser.parse_args(argv)

    names = args.only or tables.trained(MODELS)
    record = tables.CellRecord(tables.RESULTS / f"{args.record}.json",
                               {"zoo": "v2", "eval_limit": args.eval_limit, "search_batch": args.search_batch,
                                "search_steps": args.search_steps, "threshold": args.threshold})
    command = "python experiments/bna_tables_v2.py" + ("" if args.record == RECORD else f" --record {args.record}")
    for name in names:
        run = tables.zoo_run("v2", name)
        attack = run.record["spec"]["attack"]
        methods = {(bna_label(args.sources) if m == "bna" else m): (m, bna_overrides(attack, args) if m == "bna" else {})
                   for m in args.methods}
        for seed in args.seeds:
            tables.measure(run, name, attack, args.clean_per_class, seed, methods, record, args.data_dir,
                           args.eval_limit, evaluate=evaluate_rule,
                           extra={"target_mode": run.record["spec"]["target_mode"]})
            (tables.RESULTS / f"{args.record}.md").write_text(markdown(record, command))
    print(f"wrote {tables.RESULTS / args.record}.{{json,md}}")


if __name__ == "__main__":
    main()
