"""``python -m bdjax.attacks.lf_trigger``: find the LF attack's perturbation on a trained clean run.

Writes f32[H, W, C] to an .npy file for ``bdjax train --attack lf --attack-arg perturbation_file=FILE``
(see ``bdjax.attacks.lf``). Example::

    python -m bdjax.attacks.lf_trigger --run experiments/zoo/resnet20-gtsrb-clean --target 14 --out lf-gtsrb-14.npy
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import numpy as np

from bdjax import checkpoint
from bdjax.attacks.base import TargetMap
from bdjax.attacks.lf import LFSearchConfig, find_lf_perturbation
from bdjax.cli import add_config_options, config_from_options
from bdjax.data import load, stratified_subset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdjax.attacks.lf_trigger", description=(
        "Find a low-frequency universal perturbation (the LF attack's trigger) on a clean model "
        "and save it as an .npy file for `bdjax train --attack lf --attack-arg perturbation_file=FILE`."))
    parser.add_argument("--run", required=True, help="run directory of a clean model, e.g. "
                        "experiments/zoo/resnet20-gtsrb-clean")
    parser.add_argument("--target", type=int, required=True, help="target class (all-to-one)")
    parser.add_argument("--out", required=True, help="the .npy file to write")
    parser.add_argument("--clean-images", type=int, default=500,
                        help="stratified training images the search uses (default 500)")
    add_config_options(parser, LFSearchConfig)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    run = checkpoint.load(args.run)
    if run.attack is not None:
        print(f"warning: {args.run} was trained with attack {run.attack.name}; LF expects a clean model",
              file=sys.stderr)
    config = config_from_options(args, LFSearchConfig)
    train_set = load(run.dataset, "train", args.data_dir)
    clean = stratified_subset(train_set, min(args.clean_images, len(train_set)), jax.random.key(args.seed))
    target = TargetMap("all_to_one", args.target, train_set.info.num_classes)
    result = find_lf_perturbation(run.module, run.variables, clean, target, jax.random.key(args.seed), config)
    np.save(args.out, result.perturbation)
    l2 = math.sqrt(float(np.sum(result.perturbation ** 2)))
    print(f"wrote {args.out}: |δ|∞ {np.abs(result.perturbation).max():.4f}, |δ|₂ {l2:.3f}, targeted success "
          f"{result.success:.3f} on the clean model after {len(result.history)} step(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
