"""Seconds per defense on one model, one clean set and one evaluation set.

    BDJAX_DATA_DIR=../shared/data python experiments/defense_benchmark.py --budget quick
    BDJAX_DATA_DIR=../shared/data python experiments/defense_benchmark.py            # library defaults

Every registered defense (``bdjax.defenses.DEFENSES``) runs on the same zoo run (default
zoo v2 ResNet-20 GTSRB BadNets; the zoo v1 medium-bn table of 2026-11-30 is kept as
``results/defense_benchmark_zoo_v1.md``), with the same defender's clean set (``--per-class`` images of every
class from the test split) and is evaluated on the same held-out test images. "defense s" is
the defense function itself, compilation included, evaluation excluded (TAC and ABS, the
thesis's methods, get one image per class of that clean set, their setting). Input filters (CETF,
STRIP, NEO, BNA's test-time rule) do their work per input at evaluation: for them "screening s
/ input" is the evaluation time divided by the inputs screened, on a smaller evaluation subset
(``--filter-eval``) so that CETF's per-input search fits. CETF's repairs screen
``--suspects`` deployment inputs (half triggered, drawn from the TRAINING split so that they
never overlap the evaluation images).

``--budget quick`` shrinks the searches and epochs (table QUICK below, printed in the output)
so the whole benchmark takes about 1.5 hours on one CPU core; ``default`` uses each method's
library defaults (many hours on a CPU: NC and BNA search every label or class pair with 300
steps, ANP runs 2,000 iterations, TAC 1,000 reconstruction epochs). One JSON record per method
is kept in ``--records`` and skipped on a rerun; the table is rewritten from the records.
The header gives the model's training images/s (from its run record) and its inference
images/s on the evaluation set (measured here, compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint, defenses
from bdjax.data import clean_defense_split, load, stratified_subset
from bdjax.evaluation import TestSets, evaluate, evaluate_model, model_classifier
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)

HERE = Path(__file__).resolve().parent

_QUICK_CETF = {"population_size": 20, "max_generations": 15, "patience": 5}
_QUICK_FT = {"epochs": 10}
_QUICK_REVERSE = {"steps": 60}
QUICK: dict[str, dict] = {
    "ft": _QUICK_FT,
    "cetf": _QUICK_CETF,
    "cetf+bn-clean": {"cetf": _QUICK_CETF},
    "cetf+bn-unlearn": {"cetf": _QUICK_CETF},
    "cetf+unlearn": {"cetf": _QUICK_CETF},
    "anp": {"iterations": 200},
    "nad": {"epochs": 5, "teacher_epochs": 5},
    "tac": {"ce_epochs": 10, "target_epochs": 50, "original_epochs": 200, "max_candidates": 4},
    "abs": {"candidates": 4, "epochs": 50},  # its reversal is full-batch over the clean set per candidate
    "fp": {"finetune": _QUICK_FT},
    "tsbd": {"finetune": _QUICK_FT},
    "bna": {"reverse": _QUICK_REVERSE, "source_classes": (1, 2, 3), "align_all_sources": True},
    "ibau": {"rounds": 2},
    "nc": {"reverse": _QUICK_REVERSE},
}
CETF_REPAIRS = ("cetf+bn-clean", "cetf+bn-unlearn", "cetf+unlearn")
# The TAC thesis's methods work on one clean image per class (its setting); their reversal runs
# full-batch over the clean set, so they get that much of the same clean set (a subset of it).
PER_CLASS = {"tac": 1, "abs": 1}


def suspects(run: checkpoint.Run, count: int, data_dir, seed: int = 0) -> np.ndarray:
    """uint8[count]: deployment inputs for CETF's repairs, half of them carrying the trigger."""
    train = stratified_subset(load(run.dataset, "train", data_dir), 10 * count, seed)
    rng = np.random.default_rng(seed)
    non_target = np.flatnonzero(train.labels != run.target.target)
    picked = rng.choice(non_target, count, replace=False)
    images = np.array(train.images[picked])
    images[: count // 2] = run.attack.apply_uint8(images[: count // 2])
    return images


def bench_one(run, method: str, overrides: dict, clean, sets, filter_sets, seed: int) -> dict:
    spec = defenses.get(method)
    result, seconds = tables.timed_defense(run, method, overrides, clean, seed)
    eval_sets = filter_sets if spec.detector else sets
    classifier = result.classifier or model_classifier(run.module, result.variables)
    started = time.perf_counter()
    after = evaluate(classifier, eval_sets, detector=spec.detector)
    eval_seconds = time.perf_counter() - started
    record = {"method": method, "defense_seconds": seconds, "after": after.to_dict(),
              "eval_size": len(eval_sets.clean), "filter": bool(spec.detector)}
    if spec.detector:
        record["screening_seconds_per_input"] = eval_seconds / (len(eval_sets.clean) + len(eval_sets.triggered))
    return record


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_table(path: Path, records: list[dict], header: dict) -> None:
    lines = [
        "# Seconds per defense on one model (issue 8's speed benchmark)",
        "",
        f"Generated by `{header['command']}` on {header['machine']}.",
        f"Model: zoo `{header['run']}`; defender's clean set {header['defense_size']} test images "
        f"({header['per_class']} per class); evaluation: {header['eval_size']} other test images "
        f"(input filters: {header['filter_eval']}). Before any defense: {header['before']}.",
        f"Throughput: training {header.get('train_images_per_s', '–')} images/s (the run's record, "
        f"its training machine), inference {header.get('inference_images_per_s', '–')} images/s "
        "(clean evaluation set, this machine, compilation excluded).",
        f"Budget: {header['budget']} (overrides per method in the table). \"defense s\" = the defense "
        "itself, compilation included, evaluation excluded; filters also report evaluation seconds per "
        "screened input. ACC/ASR of a filter count rejected inputs as wrong / failed.",
        "",
        *([header["note"], ""] if header.get("note") else []),
        "| method | clean set | overrides | defense s | screening s / input | ACC % | ASR % | TPR % | FPR % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        a = r["after"]
        per_input = r.get("screening_seconds_per_input")
        lines.append(f"| {r['method']} | {r.get('defense_size', header['defense_size'])} | "
                     f"{json.dumps(r['overrides']) if r['overrides'] else '—'} | "
                     f"{r['defense_seconds']:.1f} | {'–' if per_input is None else f'{per_input:.2f}'} | "
                     f"{_pct(a['acc'])} | {_pct(a['asr'])} | {_pct(a.get('tpr'))} | {_pct(a.get('fpr'))} |")
    path.write_text("\n".join(lines) + "\n")


def shown_arguments(argv: list[str]) -> list[str]:
    """The arguments the table's "Generated by" line names: all but ``--note`` (the table prints it)."""
    argv = list(argv)
    return [a for i, a in enumerate(argv) if not (a.startswith("--note") or (i and argv[i - 1] == "--note"))]


def save(path: Path, run_name: str, budget: str, note: str | None, records: dict) -> None:
    payload = {"run": run_name, "budget": budget, "records": records, **({"note": note} if note else {})}
    path.write_text(json.dumps(payload, indent=1))


def _header(args, run, run_name, clean, sets, filter_sets) -> dict:
    before = evaluate_model(run.module, run.variables, sets)  # compiles the evaluation
    started = time.perf_counter()  # the same evaluation again: inference images/s, compilation excluded
    evaluate_model(run.module, run.variables, sets)
    inference = (len(sets.clean) + len(sets.triggered)) / (time.perf_counter() - started)
    trained = run.record.get("images_per_second")
    before_filter = evaluate_model(run.module, run.variables, filter_sets)
    return {
        "command": " ".join(["python experiments/defense_benchmark.py", *args.argv]),
        "machine": f"{jax.default_backend()} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} logical cores)",
        "run": run_name, "defense_size": len(clean), "per_class": args.per_class,
        "eval_size": len(sets.clean), "filter_eval": f"{len(filter_sets.clean)} clean + "
                                                     f"{len(filter_sets.triggered)} triggered",
        "before": f"ACC {100 * before.acc:.1f} %, ASR {100 * before.asr:.1f} % (filter subset: ACC "
                  f"{100 * before_filter.acc:.1f} %, ASR {100 * before_filter.asr:.1f} %)", "budget": args.budget,
        "train_images_per_s": "–" if trained is None else f"{trained:.0f}",
        "inference_images_per_s": f"{inference:.0f}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(HERE / "zoo-v2" / "resnet20-gtsrb-badnets"))
    parser.add_argument("--budget", choices=("quick", "default"), default="quick")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered defense")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--filter-eval", type=int, default=20, help="clean images the input filters screen")
    parser.add_argument("--suspects", type=int, default=20, help="deployment inputs CETF's repairs screen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--records", type=Path, default=HERE / "results" / "defense_benchmark.json")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "defense_benchmark.md")
    parser.add_argument("--note", default=None,
                        help="how the seconds were measured (e.g. beside other jobs), kept in the records")
    args = parser.parse_args(argv)
    args.argv = shown_arguments(sys.argv[1:] if argv is None else argv)

    run = checkpoint.load(args.run)
    clean, sets = split_for_defense(run, args.per_class, args.seed, args.data_dir, args.eval_limit)
    filter_sets = TestSets.build(stratified_subset(sets.clean, args.filter_eval, args.seed + 2), run.attack, run.target)
    methods = args.methods or list(defenses.DEFENSES)
    unknown = sorted(set(methods) - set(defenses.DEFENSES))
    if unknown:
        parser.error(f"unknown defenses {unknown}; registered: {sorted(defenses.DEFENSES)}")
    stored = json.loads(args.records.read_text()) if args.records.is_file() else {}
    run_name = Path(args.run).name
    if stored and (stored.get("run"), stored.get("budget")) != (run_name, args.budget):
        parser.error(f"{args.records} holds records for {stored.get('run')} / {stored.get('budget')}: "
                     "pass another --records")
    records = stored.get("records", {})
    note = args.note if args.note is not None else stored.get("note")
    suspect_images = suspects(run, args.suspects, args.data_dir, args.seed)
    header = dict(_header(args, run, run_name, clean, sets, filter_sets), note=note)
    for method in methods:
        if method in records:
            print(f"[skip] {method}: recorded", flush=True)
            continue
        overrides = dict(QUICK.get(method, {})) if args.budget == "quick" else {}
        shown = dict(overrides)
        if method in CETF_REPAIRS:
            overrides["suspect_images"] = suspect_images
            shown["suspects"] = len(suspect_images)
        defense_set = clean
        if method in PER_CLASS and PER_CLASS[method] < args.per_class:
            defense_set = clean_defense_split(clean, PER_CLASS[method], args.seed)[0]
        record = bench_one(run, method, overrides, defense_set, sets, filter_sets, args.seed)
        record["defense_size"] = len(defense_set)
        record["overrides"] = shown
        records[method] = record
        print(f"{method}: {record['defense_seconds']:.1f} s, after {record['after']}", flush=True)
        save(args.records, run_name, args.budget, note, records)
        write_table(args.out, [records[m] for m in methods if m in records], header)
    save(args.records, run_name, args.budget, note, records)
    write_table(args.out, [records[m] for m in methods if m in records], header)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
