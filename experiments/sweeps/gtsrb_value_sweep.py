"""A value sweep on the zoo's GTSRB BadNets models: FT seeds × learning rates, CLP u, suspicion μ.

    bdjax sweep experiments/sweeps/gtsrb_value_sweep.py                  # local: medium-bn, 2 cells
    bdjax sweep experiments/sweeps/gtsrb_value_sweep.py --variant full   # + ResNet-20 and Blended
    bdjax sweep experiments/sweeps/gtsrb_value_sweep.py --sequential     # the same, one setting at a time

Every grid below varies only values, so each cell is one vmapped program (16 fine-tunings,
8 CLP thresholds, 8 suspicion thresholds), sharded over all devices.
"""

from bdjax.sweep import Grid, SweepConfig


def get_config(variant: str = "local") -> SweepConfig:
    runs = ["../zoo/medium-bn-gtsrb-badnets"]
    if variant == "full":
        runs += ["../zoo/medium-bn-gtsrb-blended", "../zoo/resnet20-gtsrb-badnets", "../zoo/resnet20-gtsrb-blended"]
    elif variant != "local":
        raise ValueError(f"unknown variant {variant!r}: local or full")
    return SweepConfig(
        name=f"gtsrb-value-sweep-{variant}",
        runs=tuple(runs),
        grids=(
            Grid("ft", fixed={"epochs": [5]},
                 values={"learning_rate": [0.003, 0.01, 0.03, 0.1], "seed": [0, 1, 2, 3]}),
            Grid("clp", values={"u": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]}),
            Grid("suspicion", values={"mu": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]}),
        ),
        clean_per_class=2,  # 86 GTSRB images
        eval_limit=2000 if variant == "local" else None,
    )
