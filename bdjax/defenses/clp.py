"""CLP: data-free pruning of channels with a high channel Lipschitz constant.

Zheng, Tang, Li & Liu, "Data-Free Backdoor Removal Based on Channel Lipschitzness",
ECCV 2022. Per BN-paired conv, the upper bound of each channel's Lipschitz constant (UCLC)
is the largest singular value of its BN-merged kernel; channels above mean + u · std of
their layer have γ and β zeroed. No data is used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.data.dataset import Dataset
from bdjax import sharding
from bdjax.defenses.base import DefenseResult, register, register_batched
from bdjax.defenses.channel_lipschitz import mask_bn_channels, outliers_above, prune_bn_channels, unit_lipschitz


@dataclasses.dataclass(frozen=True)
class ClpConfig:
    """``u = 3``: the default of CLP's official code (``--u 3``) and of BackdoorBench's CLP,
    and the CLP baseline setting in the TAC-pruning thesis (SPEC, "Baselines")."""

    u: float = 3.0


@register("clp", ClpConfig, kind="pruning",
          paper="Zheng et al., ECCV 2022",
          summary="CLP: prune channels with outlying channel Lipschitz constants (data-free)")
def clp(module, variables, clean: Dataset | None, key, config: ClpConfig = ClpConfig()) -> DefenseResult:
    """Zero the BN neurons of channels whose UCLC exceeds mean + u · std in their layer.

    ``clean`` and ``key`` are ignored (CLP is data-free and deterministic).
    """
    del clean, key
    scores = unit_lipschitz(module, variables)
    masks = {name: outliers_above(s, config.u) for name, s in scores.items()}
    new_variables, pruned = prune_bn_channels(module, variables, masks)
    return DefenseResult(new_variables, info={
        "scores": {name: jax.device_get(s) for name, s in scores.items()},
        "pruned": pruned,
        "pruned_count": sum(len(c) for c in pruned.values()),
    })


@register_batched("clp", axes=("u",))
def clp_many(module, variables, clean, key, config: ClpConfig, values: dict, mesh=None):
    """CLP for every u in ``values["u"]`` from one set of channel Lipschitz constants."""
    del clean, key, config
    scores = unit_lipschitz(module, variables)

    def one(u):
        return mask_bn_channels(module, variables, {name: outliers_above(s, u) for name, s in scores.items()})
    return jax.jit(jax.vmap(one))(sharding.shard_leading(jnp.asarray(values["u"], jnp.float32), mesh))
