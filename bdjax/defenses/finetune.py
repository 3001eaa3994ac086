"""FT: plain fine-tuning on the defender's clean set (the simplest baseline in every table)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register, register_batched, seed_keys, tile
from bdjax.training import TrainConfig, train_many, unstack_models


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """BackdoorBench's FT: SGD lr 0.01 (momentum 0.9, wd 5e-4) with a cosine schedule.

    ``epochs`` counts passes over the (small) clean set; with a tiny set each epoch is
    only a few steps, so the default is larger than for full-data training.
    """

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4


def _train_config(config: FinetuneConfig, clean: Dataset) -> TrainConfig:
    return TrainConfig(epochs=config.epochs, batch_size=min(config.batch_size, len(clean)),
                       optimizer="sgd", learning_rate=config.learning_rate, momentum=config.momentum,
                       weight_decay=config.weight_decay, schedule="cosine", crop_padding=config.crop_padding)


@register("ft", FinetuneConfig, kind="fine-tuning",
          paper="baseline (e.g. Liu et al., RAID 2018)",
          summary="fine-tune all parameters on the clean set")
def finetune(module, variables, clean: Dataset, key, config: FinetuneConfig = FinetuneConfig()) -> DefenseResult:
    """Fine-tune every parameter (and BN statistics) on ``clean`` with cross-entropy."""
    check_clean_set(clean, "fine-tuning")
    # The rate goes in as a per-model scale (the compiled step's own rate is 1.0), so a sweep
    # that loops over learning rates compiles the step once, not once per rate.
    result = train_many(module, clean, _train_config(config, clean), jnp.asarray(key)[None],
                        variables=tile(variables, 1), learning_rates=[config.learning_rate], progress=False)
    return DefenseResult(unstack_models(result.variables, 1)[0],
                         info={"train_loss": [float(h["loss"][0]) for h in result.history]})


# Vmapped over parameter sets, each convolution becomes a grouped one, which XLA:CPU runs
# slowly: 16 settings took 83 s vmapped and 41 s as a loop on 2 cores (sweep_benchmark.md).
@register_batched("ft", axes=("seed", "learning_rate"), slower_on_cpu=True)
def finetune_many(module, variables, clean: Dataset, key, config: FinetuneConfig, values: dict, mesh=None):
    """N fine-tunings at once (``train_many``): one per seed and/or learning rate in ``values``."""
    check_clean_set(clean, "fine-tuning")
    n = len(next(iter(values.values())))
    learning_rates = values.get("learning_rate")
    result = train_many(module, clean, _train_config(config, clean), seed_keys(key, values, n),
                        variables=tile(variables, n), learning_rates=learning_rates, mesh=mesh, progress=False)
    return result.variables
