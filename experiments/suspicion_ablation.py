"""Hashemifar et al.'s ablation (Table III: each heuristic alone) and μ curve (Fig. 3) on zoo v2.

    python experiments/suspicion_ablation.py                     # the CIFAR-10 Table I models, seeds 0-2
    python experiments/suspicion_ablation.py --only resnet20-cifar10-blended --seeds 0 --mus 3.5 3
    python experiments/suspicion_ablation.py --table-only        # the Markdown and figure from the record

Per model and seed: the defender's 1 clean test image per class (the paper's 10 on CIFAR-10,
drawn by the seed, as in ``suspicion_table.py``); the four measurements and eq. 6 are taken once,
and every heuristic (eq. 6, eq. 6 without the square root, each measurement alone) prunes the
channels above mean + μ·std of its layer for every μ. ASR / ACC on the rest of the test split
(``--eval-limit N``: a stratified subset). A μ that prunes the same channels as one already
measured (e.g. none) reuses that measurement. Writes ``results/suspicion_ablation.{json,md}``
and ``results/figures/suspicion-mu-v2.png``; the JSON keeps every finished cell, so a killed
run continues. Paper numbers are CIFAR-10 ResNet-18 (its Table III and Fig. 3): context,
never measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bdjax.defenses import suspicion
from bdjax.metrics import defense_effectiveness_rating
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)
from suspicion_sweep import ablation_table, plot_mu_curves  # noqa: E402

MODELS = ("resnet20-cifar10-badnets-1pct", "resnet20-cifar10-blended", "resnet20-cifar10-trojan",
          "resnet20-cifar10-sig")
MUS = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0)
FIGURE = tables.RESULTS / "figures" / "suspicion-mu-v2.png"
# Hashemifar et al., Table III (CIFAR-10 ResNet-18, 10 clean images; μ not stated per column):
# {attack: {heuristic: (ASR, ACC)}}; "cl" is the paper's clean-label attack (ours: SIG).
PAPER_TABLE_III = {
    "badnets": {"spectral": (7.15, 86.60), "saliency": (89, 75.26), "activation": (100, 90.93),
                "correlation": (1.18, 69.97), "score_no_sqrt": (7.82, 91.39), "score": (1.27, 89.23)},
    "blended": {"spectral": (3.0, 90.25), "saliency": (16.61, 82.57), "activation": (99.90, 92.01),
                "correlation": (0.10, 83.14), "score_no_sqrt": (1.06, 88.93), "score": (1.38, 90.59)},
    "trojan": {"spectral": (11.37, 82.14), "saliency": (56.54, 61.75), "activation": (75.02, 92.50),
               "correlation": (85.54, 35.50), "score_no_sqrt": (1.35, 83.19), "score": (4.67, 86.19)},
    "cl": {"spectral": (4.54, 90.98), "saliency": (35.28, 75.20), "activation": (55.95, 93.51),
           "correlation": (7.38, 84.85), "score_no_sqrt": (0.73, 89.77), "score": (2.28, 90.31)},
}


def measure_seed(run, name: str, seed: int, record: tables.CellRecord, mus, args) -> None:
    """Every missing (heuristic, μ) cell of (``name``, ``seed``), and the undefended one."""
    todo = [(h, mu) for h in suspicion.HEURISTICS for mu in mus
            if record.find(run=name, seed=seed, heuristic=h, mu=mu) is None]
    if not todo and record.find(run=name, seed=seed, method="none") is not None:
        return
    clean, sets = split_for_defense(run, 1, seed, args.data_dir, args.eval_limit)
    base = dict(run=name, attack=run.record["spec"]["attack"], dataset=run.dataset, model=run.record["model"],
                k=1, seed=seed, defense_size=len(clean), eval_size=len(sets.clean), triggered_size=len(sets.triggered))

    before = record.find(run=name, seed=seed, method="none")
    if before is None:
        before = dict(base, method="none", heuristic=None, mu=None, pruned=0, der=None, seconds=None,
                      **tables._model_rates(run.module, run.variables, sets))
        record.add(before)
        print(tables.line(before), flush=True)
    started = time.perf_counter()
    scores = suspicion.suspicion_scores(run.module, run.variables, clean)
    seconds = time.perf_counter() - started  # the measurements; every threshold after them is free
    measured = {(): {"acc": before["acc"], "asr": before["asr"]}}  # pruned set -> rates
    for heuristic in dict.fromkeys(h for h, _ in todo):
        mine = [mu for h, mu in todo if h == heuristic]
        for mu, (variables, pruned) in zip(mine, suspicion.sweep_mu(run.module, run.variables, scores, mine, heuristic)):
            key = tuple(sorted((unit, tuple(int(i) for i in idx)) for unit, idx in pruned.items() if len(idx)))
            if key not in measured:
                measured[key] = tables._model_rates(run.module, variables, sets)
            count = sum(len(idx) for _, idx in key)
            cell = dict(base, method="suspicion", heuristic=heuristic, mu=mu, pruned=count, seconds=seconds,
                        der=defense_effectiveness_rating(before["acc"], before["asr"], measured[key]["acc"],
                                                         measured[key]["asr"]), **measured[key])
            record.add(cell)
            print(tables.line(cell) + f" [{heuristic} μ={mu:g}, {count} channels]", flush=True)


def markdown(record: tables.CellRecord, command: str) -> str:
    cells = [dict(c, model=c["run"]) for c in record.cells]
    seeds = sorted({c["seed"] for c in cells})
    eval_sizes = sorted({c["eval_size"] for c in cells})
    return "\n".join([
        "# Suspiciousness score on zoo v2: the ablation (Table III) and the μ curve (Fig. 3)", "",
        f"Generated by `{command}` from `{record.path.name}`. Defense set: 1 clean test image per class "
        f"(the paper's 10 on CIFAR-10), drawn per seed (seeds {', '.join(map(str, seeds))}); ASR / ACC (%) on "
        f"the rest of the test split ({', '.join(map(str, eval_sizes))} clean images), mean ± sample std over "
        "the seeds, and the mean number of channels pruned in brackets. Rows: eq. 6 (`score`), eq. 6 without "
        "the square root, each measurement alone; columns: μ (prune channels above mean + μ·std of their "
        f"layer; the library's default is {suspicion.SuspicionConfig.mu:g}). Figure: `figures/{FIGURE.name}` "
        "(solid ASR, dashed ACC, the mean over seeds).", "",
        "**Paper (CIFAR-10 ResNet-18, Table III, ASR / ACC %; its μ per column is not stated; Fig. 3: μ >= 4 "
        "prunes nothing on BadNets and Blend, μ >= 8 on Trojan and CL): reported, not measured here.**", "",
        "| attack | " + " | ".join(suspicion.HEURISTICS) + " |", "|---|" + "---|" * len(suspicion.HEURISTICS),
        *(f"| {attack} | " + " | ".join("{:g} / {:g}".format(*row[h]) for h in suspicion.HEURISTICS) + " |"
          for attack, row in PAPER_TABLE_III.items()), "",
        "**Ours:**", "",
        ablation_table(cells),
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="zoo v2 run names (default: those of MODELS that exist)")
    parser.add_argument("--mus", type=float, nargs="+", default=list(MUS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-limit", type=int, default=None, help="default: the whole rest of the test split")
    parser.add_argument("--record", default="suspicion_ablation", help="results/NAME.{json,md}")
    parser.add_argument("--table-only", action="store_true", help="rewrite the Markdown and figure from the record")
    args = parser.parse_args(argv)

    names = args.only or tables.trained(MODELS)
    record = tables.CellRecord(tables.RESULTS / f"{args.record}.json", {"zoo": "v2", "eval_limit": args.eval_limit})
    command = "python experiments/suspicion_ablation.py" + ("" if args.record == "suspicion_ablation"
                                                            else f" --record {args.record}")
    for name in [] if args.table_only else names:
        run = tables.zoo_run("v2", name)
        for seed in args.seeds:
            measure_seed(run, name, seed, record, args.mus, args)
            (tables.RESULTS / f"{args.record}.md").write_text(markdown(record, command))
    (tables.RESULTS / f"{args.record}.md").write_text(markdown(record, command))
    if args.record == "suspicion_ablation":
        plot_mu_curves([dict(c, model=c["run"]) for c in record.cells], FIGURE)
    print(f"wrote {tables.RESULTS / args.record}.{{json,md}}")


if __name__ == "__main__":
    main()
