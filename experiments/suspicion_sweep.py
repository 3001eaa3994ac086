"""Suspiciousness-score pruning and CLP on the zoo's backdoored models, beside the paper.

    python experiments/suspicion_sweep.py                      # every zoo run that exists
    python experiments/suspicion_sweep.py --only resnet20-gtsrb-badnets --mus 3.5 3 2.5 2 1 --us 3 2 1.5
    python experiments/suspicion_sweep.py --only resnet20-cifar10-badnets --heuristics all \
        --mus 4 3.5 3 2.5 2 1.5 1 0.5 --json mu.json --plot mu.png   # Table III and Fig. 3

Defense set: 1 clean test image per class (the paper's "one sample per label"; 43 for
GTSRB), the rest of the test split (``--eval-limit`` of it) measures ACC / ASR. The scores
are measured once per model; every μ of the sweep and every heuristic of the ablation
(Table III: each heuristic alone, eq. 6 without the square root) only re-thresholds them.
Paper numbers are CIFAR-10 ResNet-18 averages over 4 attacks (Table I), not GTSRB.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bdjax import checkpoint
from bdjax.defenses import clp, suspicion
from bdjax.evaluation import evaluate_model
from bdjax.runs import split_for_defense

import tables  # experiments/tables.py: this folder is on the path when a script of it runs

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
# Hashemifar et al., Table I (CIFAR-10 ResNet-18, 10 clean images, average of 4 attacks).
PAPER = {"before": (99.94, 93.40), "suspicion": (2.4, 89.08), "clp": (6.51, 87.49)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="zoo run names (default: all that exist)")
    parser.add_argument("--clean-per-class", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--mus", type=float, nargs="*", default=[suspicion.SuspicionConfig.mu])
    parser.add_argument("--us", type=float, nargs="*", default=[clp.ClpConfig.u], help="CLP thresholds")
    parser.add_argument("--heuristics", nargs="*", default=["score"],
                        help=f"any of {', '.join(suspicion.HEURISTICS)}, or 'all' (Table III's ablation)")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument("--md", type=Path, help="write the ablation matrix (heuristic x μ, Table III) here")
    parser.add_argument("--plot", type=Path, help="draw ASR / ACC against μ per heuristic (Fig. 3) to this PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    heuristics = list(suspicion.HEURISTICS) if args.heuristics == ["all"] else args.heuristics
    for heuristic in heuristics:
        if heuristic not in suspicion.HEURISTICS:
            parser.error(f"unknown heuristic {heuristic!r}; choose from {', '.join(suspicion.HEURISTICS)}")
    records = []

    names = args.only or sorted(p.parent.name for p in ZOO_DIR.glob("*/record.json"))
    print("| model | method | defense set | pruned | ASR % | ACC % | seconds | paper ASR / ACC % |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        run = checkpoint.load(ZOO_DIR / name)
        clean, sets = split_for_defense(run, args.clean_per_class, args.seed, args.data_dir, args.eval_limit)
        before = evaluate_model(run.module, run.variables, sets)
        row = f"| {name} | {{}} | {len(clean)} | {{}} | {{:.2f}} | {{:.2f}} | {{:.1f}} | {{}} |"
        print(row.format("none", 0, 100 * before.asr, 100 * before.acc, 0.0, "%.2f / %.2f" % PAPER["before"]))
        records.append(dict(model=name, method="none", asr=before.asr, acc=before.acc))

        started = time.perf_counter()
        scores = suspicion.suspicion_scores(run.module, run.variables, clean)
        seconds = time.perf_counter() - started
        for heuristic in heuristics:
            label = "suspicion" if heuristic == "score" else f"suspicion[{heuristic}]"
            swept = suspicion.sweep_mu(run.module, run.variables, scores, args.mus, heuristic)
            for mu, (variables, pruned) in zip(args.mus, swept):
                after = evaluate_model(run.module, variables, sets)
                count = sum(map(len, pruned.values()))
                print(row.format(f"{label} μ={mu:g}", count, 100 * after.asr, 100 * after.acc, seconds,
                                 "%.2f / %.2f" % PAPER["suspicion"] if heuristic == "score" else ""), flush=True)
                records.append(dict(model=name, method="suspicion", heuristic=heuristic, mu=mu, pruned=count,
                                    asr=after.asr, acc=after.acc, seconds=seconds))

        for u in args.us:
            started = time.perf_counter()
            result = clp.clp(run.module, run.variables, None, None, clp.ClpConfig(u))
            seconds = time.perf_counter() - started
            after = evaluate_model(run.module, result.variables, sets)
            print(row.format(f"clp u={u:g}", result.info["pruned_count"], 100 * after.asr, 100 * after.acc,
                             seconds, "%.2f / %.2f" % PAPER["clp"]), flush=True)
            records.append(dict(model=name, method="clp", u=u, pruned=result.info["pruned_count"],
                                asr=after.asr, acc=after.acc, seconds=seconds))
        if args.json:
            args.json.write_text(json.dumps(records, indent=1))
    if args.md:
        args.md.write_text(ablation_table(records))
        print(f"wrote {args.md}")
    if args.plot:
        plot_mu_curves(records, args.plot)


def ablation_table(records: list[dict]) -> str:
    """Per model: a row per heuristic, a column per μ, cells "ASR / ACC (channels pruned)"; rows of
    several seeds (same model, heuristic and μ) give mean ± sample std and the mean count."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model and r["method"] == "suspicion"]
        none = [r for r in records if r["model"] == model and r["method"] == "none"]
        mus = sorted({r["mu"] for r in rows}, reverse=True)
        rate = lambda group, key: tables.mean_std([r[key] for r in group], digits=1, count=False)  # noqa: E731
        before = lambda key: tables.mean_std([r[key] for r in none], count=False)  # noqa: E731
        lines += [f"**{model}** (no defense: ASR {before('asr')} / ACC {before('acc')} %"
                  + (f", {len(none)} seeds)" if len(none) > 1 else ")"), "",
                  "| heuristic | " + " | ".join(f"μ = {mu:g}" for mu in mus) + " |",
                  "|---|" + "---|" * len(mus)]
        for heuristic in dict.fromkeys(r["heuristic"] for r in rows):
            cells = {mu: [r for r in rows if r["heuristic"] == heuristic and r["mu"] == mu] for mu in mus}
            lines.append(f"| {heuristic} | " + " | ".join(
                "{} / {} ({:g})".format(rate(cells[mu], "asr"), rate(cells[mu], "acc"),
                                        round(float(np.mean([r["pruned"] for r in cells[mu]])), 1))
                if cells[mu] else "–" for mu in mus) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_mu_curves(records: list[dict], out: Path):
    """One panel per model: ASR (solid) and ACC (dashed) against μ, a colour per heuristic (the mean
    over the rows of a model, heuristic and μ: several seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in records if r["model"] == model and r["method"] == "suspicion"]
        for i, heuristic in enumerate(dict.fromkeys(r["heuristic"] for r in rows)):
            mus = sorted({r["mu"] for r in rows if r["heuristic"] == heuristic})
            mean = lambda key: [100 * np.mean([r[key] for r in rows  # noqa: E731
                                               if r["heuristic"] == heuristic and r["mu"] == mu]) for mu in mus]
            ax.plot(mus, mean("asr"), "-o", color=f"C{i}", ms=3, label=f"{heuristic} ASR")
            ax.plot(mus, mean("acc"), "--", color=f"C{i}", label=f"{heuristic} ACC")
        ax.set(title=model, xlabel="μ", ylabel="%", ylim=(-2, 102))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out, dpi=120), plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
