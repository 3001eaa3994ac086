"""``python -m bdjax.attacks.ssba_encoder``: train the SSBA attack's steganography encoder on clean images.

Writes the encoder's params to an .npz file for ``bdjax train --attack ssba --attack-arg encoder_file=FILE``
(see ``bdjax.attacks.ssba``). Example::

    python -m bdjax.attacks.ssba_encoder --dataset gtsrb --out ssba-gtsrb.npz
"""

from __future__ import annotations

import argparse
import sys

import jax

from bdjax.attacks.ssba import SSBAEncoderConfig, save_encoder, train_encoder
from bdjax.cli import add_config_options, config_from_options
from bdjax.data import load, stratified_subset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdjax.attacks.ssba_encoder", description=(
        "Train a StegaStamp encoder and decoder (the SSBA attack's trigger) on a clean training split "
        "and save the encoder as an .npz file for `bdjax train --attack ssba --attack-arg encoder_file=FILE`."))
    parser.add_argument("--dataset", required=True, help="cifar10, cifar100 or gtsrb (its training split)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--clean-images", type=int, default=None,
                        help="train on this many stratified training images (default: all)")
    add_config_options(parser, SSBAEncoderConfig)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    config = config_from_options(args, SSBAEncoderConfig)
    train_set = load(args.dataset, "train", args.data_dir)
    if args.clean_images is not None:
        train_set = stratified_subset(train_set, min(args.clean_images, len(train_set)), jax.random.key(args.seed))
    result = train_encoder(train_set, jax.random.key(args.seed), config, progress=not args.quiet)
    save_encoder(args.out, result)
    print(f"wrote {args.out}: bit accuracy {result.bit_accuracy:.3f}, PSNR {result.psnr:.1f} dB "
          f"({config.steps} steps on {len(train_set)} images in {result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
