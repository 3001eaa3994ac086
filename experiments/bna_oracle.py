"""BNA's alignment step alone, with the TRUE trigger of a zoo model (an oracle; patch, Blended and
additive attacks: ``Trigger.from_attack``; WaNet: the attack's own warp, ``AttackTrigger``),
or with a trigger re-estimated from chosen source classes (the full defense's last step alone).

    python experiments/bna_oracle.py --run resnet20-gtsrb-badnets --epochs 1 3 5 10
    python experiments/bna_oracle.py --run resnet20-cifar10-badnets --reestimate-from 4 5 6 7 8 \
        --reestimate-steps 300 1000 3000
    python experiments/bna_oracle.py --run medium-bn-gtsrb-badnets --epochs 10 --lr 0.03 --neurons position
    python experiments/bna_oracle.py --run resnet20-gtsrb-badnets --divergence --clean-run resnet20-gtsrb-clean
    python experiments/bna_oracle.py --run resnet20-cifar10-badnets-a2a --clean-per-class 100 \
        --eval-limit all --seed 0 --record bna_oracle_v2      # one JSON row per (model, seed, epochs)

Models come from zoo v2 (``--zoo v1``: the first zoo, which results/bna_tables.md used). With
``--record`` the true trigger's rows are kept in ``results/NAME.json`` (the diagnosis of the
results book reads them); rows already there are skipped.

Defense set: 10 clean test images per class (``--clean-per-class``; 100 on CIFAR-10 is the paper's
table-1 "10% of the test set"); alignment on those not of the target class
(all-to-all attacks: one g_t per class t, each aligned on the images not of class t, as if
every pair (t - 1, t) had been detected); ACC / ASR / SIA of the paper's rule (flagged inputs
keep g_t(x)) on 1,000 other test images.
``--divergence``: the paper's table 13 per BN layer (TV / JS / KL summed over neurons) between
200 clean evaluation images and 200 triggered ones (not the same images), in the poisoned model
and in g_t after each alignment, and with ``--clean-run`` in a clean model of the same
architecture and dataset given the same trigger (the table's "clean DNN" row; its histogram
edges come from its own clean activations).
``--reestimate-from``: instead of the true trigger, ``bna.reestimate`` reverse-engineers one
trigger for the (all-to-one) target from the defense images of these source classes ("all": every
class but the target), once per ``--reestimate-steps``; this separates the re-estimate from the
pair search (pass the sources the full defense detected). Printed per trigger: its mask L1 and
the share of the mask's mass on the true patch's pixels (patch attacks). ``--restarts K``: K
re-estimates with different keys (``bna.reestimate(..., restarts=K)``), aligned on as a stack
stamped in turn; ``--each`` also aligns on each alone. ``--reverse``: other fields of the
re-estimate's ``ReverseConfig`` (``BNAConfig.reestimate_reverse`` in the full defense).
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bdjax.data.dataset import to_float
from bdjax.defenses import bna
from bdjax.defenses.reverse_engineer import ReverseConfig, oracle_trigger
from bdjax.runs import split_for_defense
from bdjax.surgery import bn_units
from bna_tables import divergence_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)


def _eval_limit(text: str) -> int | None:
    return None if text == "all" else int(text)


def _finite(rates: dict) -> dict:
    """JSON-safe rates: NaN (no triggered image, or none sent to a target) as None."""
    return {k: float(v) if np.isfinite(v) else None for k, v in rates.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--run", default="resnet20-gtsrb-badnets")
    parser.add_argument("--zoo", choices=sorted(tables.ZOO_DIRS), default="v2",
                        help="v1: the first zoo (the commands in results/bna_tables.md)")
    parser.add_argument("--seed", type=int, default=0, help="the defense set's draw")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10])
    parser.add_argument("--lr", type=float, default=bna.BNAConfig.learning_rate)
    parser.add_argument("--neurons", default="channel", choices=bna.NEURONS)
    parser.add_argument("--eval-limit", type=_eval_limit, default=1000,
                        help="stratified evaluation images, or 'all' (the rest of the test split)")
    parser.add_argument("--clean-per-class", type=int, default=10, help="defense-set images per class")
    parser.add_argument("--divergence", action="store_true", help="print the table-13 divergences per BN layer")
    parser.add_argument("--clean-run", help="zoo run of a clean model for the table's clean-DNN row")
    parser.add_argument("--reestimate-from", nargs="+", default=None,
                        help="source classes (or 'all') to re-estimate the trigger from instead of the true one")
    parser.add_argument("--reestimate-steps", type=int, nargs="+", default=[ReverseConfig.steps])
    parser.add_argument("--restarts", type=int, default=1,
                        help="re-estimates with different keys, aligned on in turn")
    parser.add_argument("--each", action="store_true", help="with --restarts: also align on each re-estimate alone")
    parser.add_argument("--reverse", default="{}",
                        help="other ReverseConfig fields of the re-estimate, e.g. \"{'cost_up': 1.0}\"")
    parser.add_argument("--record", default=None,
                        help="also keep each aligned row in results/NAME.json (skipped when already there)")
    args = parser.parse_args(argv)
    reverse = ast.literal_eval(args.reverse)
    run = tables.zoo_run(args.zoo, args.run)
    record = None
    if args.record:
        if args.divergence or args.reestimate_from:
            raise SystemExit("--record keeps the true trigger's alignment rows only (no --divergence, --reestimate-from)")
        record = tables.CellRecord(tables.RESULTS / f"{args.record}.json",
                                   {"zoo": args.zoo, "eval_limit": args.eval_limit, "lr": args.lr,
                                    "neurons": args.neurons})
        todo = [e for e in args.epochs if not record.find(run=args.run, k=args.clean_per_class, seed=args.seed,
                                                              epochs=e)]
        if not todo:
            print(f"{args.run} seed {args.seed}: every row is in {record.path.name}")
            return
        args.epochs = todo
    patch_attack = hasattr(run.attack, "mask")
    clean, sets = split_for_defense(run, args.clean_per_class, args.seed, args.data_dir, eval_limit=args.eval_limit)
    try:
        true_trigger = oracle_trigger(run.attack, clean.images.shape[1:])
    except ValueError as error:
        if not args.reestimate_from:
            raise SystemExit(f"{args.run}: no oracle trigger: {error}") from None
        true_trigger = None
    units = bn_units(run.module)
    edges = bna.clean_edges(run.module, run.variables, to_float(clean.images), units, neurons=args.neurons)
    target = run.target.target
    targets = range(run.target.num_classes) if run.target.mode == "all_to_all" else [target]
    if args.reestimate_from:
        if run.target.mode == "all_to_all":
            raise SystemExit("--reestimate-from: only for all-to-one models (one target)")
        sources = ([c for c in range(run.target.num_classes) if c != target] if args.reestimate_from == ["all"]
                   else [int(c) for c in args.reestimate_from])
        if target in sources:
            raise SystemExit(f"--reestimate-from: the target {target} cannot be a source")

    def triggers():
        """(name, trigger): the true one, or one re-estimate per step count, made when needed so
        each is aligned and printed before the next (longer) search starts."""
        if not args.reestimate_from:
            yield "true trigger", true_trigger
            return
        for steps in args.reestimate_steps:
            started = time.perf_counter()
            found = bna.reestimate(run.module, run.variables, clean, sources, target, jax.random.key(2),
                                   ReverseConfig(**{**reverse, "steps": steps}), restarts=args.restarts)
            seconds = time.perf_counter() - started
            stack = found if args.restarts > 1 else jax.tree_util.tree_map(lambda x: x[None], found)
            for k in range(args.restarts):
                one = stack.take(k)
                delta = float(np.linalg.norm(np.asarray(one.delta)))
                if delta > 0:  # a perturbation trigger: no mask to describe
                    shape = f"delta L2 {delta:.3f}"
                else:
                    mask = np.asarray(one.mask[..., 0])
                    top = np.argsort(-mask, axis=None)[:5]
                    where = ", ".join(f"({r}, {c}) {mask[r, c]:.2f}"
                                      for r, c in zip(*np.unravel_index(top, mask.shape)))
                    on_patch = (f", {float((one.mask * true_trigger.mask).sum() / one.mask.sum()):.2f} of it "
                                f"on the true patch" if patch_attack else "")
                    shape = f"mask L1 {mask.sum():.2f}{on_patch}; largest mask pixels (row, col) {where}"
                print(f"re-estimated from {len(sources)} sources, {steps} steps, restart {k}: {shape}", flush=True)
            print(f"({args.restarts} restart(s) in {seconds:.0f} s)", flush=True)
            if args.restarts > 1 and args.each:
                for k in range(args.restarts):
                    yield f"re-estimated, {steps} steps, restart {k} alone", stack.take(k)
            label = f", {args.restarts} restarts stamped in turn" if args.restarts > 1 else ""
            yield f"re-estimated, {steps} steps{label}", found

    def rates(aligned):
        r = bna.rule_rates(run.module, run.variables, aligned, sets)
        return r, f"ACC {r['acc']:.3f} ASR {r['asr']:.3f} SIA {r['sia']:.3f} flagged {r['tpr']:.3f}"

    undefended, text = rates({})
    print(f"{args.run}, no defense: {text}", flush=True)
    divergences = {}
    if args.divergence:
        to_target = sets.targets == target  # all-to-all: the triggered images sent to class `target`
        clean_eval = to_float(sets.clean.images[sets.clean.labels != target][:200])
        triggered_eval = to_float(sets.triggered.images[to_target][:200])
        if args.clean_run:
            other = tables.zoo_run(args.zoo, args.clean_run)
            if other.record["spec"]["attack"] != "none" or other.dataset != run.dataset:
                raise SystemExit(f"--clean-run {args.clean_run}: need a clean {run.dataset} model")
            other_edges = bna.clean_edges(other.module, other.variables, to_float(clean.images),
                                          bn_units(other.module), neurons=args.neurons)
            divergences["clean model"] = bna.divergence_table(other.module, other.variables, clean_eval,
                                                              triggered_eval, other_edges, neurons=args.neurons)
        divergences["poisoned"] = bna.divergence_table(run.module, run.variables, clean_eval, triggered_eval,
                                                       edges, neurons=args.neurons)
    for name, trigger in triggers():
        for epochs in args.epochs:
            config = bna.BNAConfig(epochs=epochs, learning_rate=args.lr, neurons=args.neurons)
            started = time.perf_counter()
            aligned = {}
            for t in targets:
                images = to_float(clean.images[clean.labels != t])
                aligned[t], losses = bna.align_batch_stats(run.module, run.variables, images, trigger, edges,
                                                           jax.random.key(1), config)
            stats = aligned[target]
            seconds = time.perf_counter() - started
            measured, text = rates(aligned)
            print(f"{name}, epochs {epochs}, lr {args.lr:g}, {args.neurons}: {text}; "
                  f"batch loss {losses[0]:.2f} -> {losses[-1]:.2f}; align {seconds:.0f} s ({len(aligned)} targets)",
                  flush=True)
            if record is not None:
                record.add({"run": args.run, "attack": run.record["spec"]["attack"], "dataset": run.dataset,
                            "target_mode": run.target.mode, "k": args.clean_per_class, "seed": args.seed,
                            "defense_size": len(clean), "eval_size": len(sets.clean), "epochs": epochs,
                            "aligned_targets": sorted(aligned), "seconds": seconds,
                            "undefended": _finite(undefended), **_finite(measured),
                            "command": "python experiments/bna_oracle.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                       else argv)})
            if args.divergence:
                label = "BNA oracle" if name == "true trigger" else f"BNA, {name}"
                divergences[f"{label}, {epochs} epochs"] = bna.divergence_table(
                    run.module, run.variables, clean_eval, triggered_eval, edges, aligned_stats=stats,
                    neurons=args.neurons)
    if divergences:
        print(divergence_markdown(divergences), flush=True)


if __name__ == "__main__":
    main()
