"""BNA's alignment step alone, with the TRUE trigger of a zoo patch-attack model (an oracle).

    python experiments/bna_oracle.py --run resnet20-gtsrb-badnets --epochs 1 3 5 10
    python experiments/bna_oracle.py --run medium-bn-gtsrb-badnets --epochs 10 --lr 0.03 --neurons position
    python experiments/bna_oracle.py --run resnet20-gtsrb-badnets --divergence --clean-run resnet20-gtsrb-clean

Defense set: 10 clean test images per class; alignment on those not of the target class
(all-to-all attacks: one g_t per class t, each aligned on the images not of class t, as if
every pair (t - 1, t) had been detected); ACC / ASR / SIA of the paper's rule (flagged inputs
keep g_t(x)) on 1,000 other test images.
``--divergence``: the paper's table 13 per BN layer (TV / JS / KL summed over neurons) between
200 clean evaluation images and 200 triggered ones (not the same images), in the poisoned model
and in g_t after each alignment, and with ``--clean-run`` in a clean model of the same
architecture and dataset given the same trigger (the table's "clean DNN" row; its histogram
edges come from its own clean activations).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax

from bdjax import checkpoint
from bdjax.data.dataset import to_float
from bdjax.defenses import bna
from bdjax.defenses.reverse_engineer import Trigger
from bdjax.runs import split_for_defense
from bdjax.surgery import bn_units
from bna_gtsrb import divergence_markdown

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--run", default="resnet20-gtsrb-badnets")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10])
    parser.add_argument("--lr", type=float, default=bna.BNAConfig.learning_rate)
    parser.add_argument("--neurons", default="channel", choices=bna.NEURONS)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--divergence", action="store_true", help="print the table-13 divergences per BN layer")
    parser.add_argument("--clean-run", help="zoo run of a clean model for the table's clean-DNN row")
    args = parser.parse_args(argv)
    run = checkpoint.load(ZOO_DIR / args.run)
    if not hasattr(run.attack, "mask"):
        raise SystemExit(f"{args.run}: the oracle needs a patch attack (mask + pattern), got {type(run.attack).__name__}")
    clean, sets = split_for_defense(run, 10, 0, args.data_dir, eval_limit=args.eval_limit)
    trigger = Trigger.patch(run.attack.mask, run.attack.pattern)
    units = bn_units(run.module)
    edges = bna.clean_edges(run.module, run.variables, to_float(clean.images), units, neurons=args.neurons)
    target = run.target.target
    targets = range(run.target.num_classes) if run.target.mode == "all_to_all" else [target]

    def rates(aligned):
        r = bna.rule_rates(run.module, run.variables, aligned, sets)
        return f"ACC {r['acc']:.3f} ASR {r['asr']:.3f} SIA {r['sia']:.3f} flagged {r['tpr']:.3f}"

    print(f"{args.run}, no defense: {rates({})}", flush=True)
    tables = {}
    if args.divergence:
        to_target = sets.targets == target  # all-to-all: the triggered images sent to class `target`
        clean_eval = to_float(sets.clean.images[sets.clean.labels != target][:200])
        triggered_eval = to_float(sets.triggered.images[to_target][:200])
        if args.clean_run:
            other = checkpoint.load(ZOO_DIR / args.clean_run)
            if other.record["spec"]["attack"] != "none" or other.dataset != run.dataset:
                raise SystemExit(f"--clean-run {args.clean_run}: need a clean {run.dataset} model")
            other_edges = bna.clean_edges(other.module, other.variables, to_float(clean.images),
                                          bn_units(other.module), neurons=args.neurons)
            tables["clean model"] = bna.divergence_table(other.module, other.variables, clean_eval,
                                                         triggered_eval, other_edges, neurons=args.neurons)
        tables["poisoned"] = bna.divergence_table(run.module, run.variables, clean_eval, triggered_eval, edges,
                                                  neurons=args.neurons)
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
        print(f"epochs {epochs}, lr {args.lr:g}, {args.neurons}: {rates(aligned)}; "
              f"batch loss {losses[0]:.2f} -> {losses[-1]:.2f}; align {seconds:.0f} s ({len(aligned)} targets)",
              flush=True)
        if args.divergence:
            tables[f"BNA oracle, {epochs} epochs"] = bna.divergence_table(
                run.module, run.variables, clean_eval, triggered_eval, edges, aligned_stats=stats,
                neurons=args.neurons)
    if tables:
        print(divergence_markdown(tables), flush=True)


if __name__ == "__main__":
    main()
