"""Trigger reconstruction + Trigger-Activated-Change pruning (Koldenhof, MSc thesis 2023).

"Neural Network Backdoor Removal by Reconstructing Triggers and Pruning Channels"
(``papers/trigger-reconstruction-tac-pruning.md``, alg. 1):

1. Candidates (sec. 4.1): per conv unit, the variance over the clean images of each
   channel's ‖output‖_F (post-BN where BN follows; Polyak & Wolf's "reduce" criterion);
   channels whose layer-wise z-score is below ``u_candidate`` = −2, deepest unit first.
2. Trigger reconstruction (sec. 4.2, ``trigger_reconstruction``): an intermediate trigger
   per candidate, then an input-space trigger for the valid ones.
3. TAC (sec. 4.3): for every valid trigger t, TAC_k(t) = mean_x ‖f_k(x) − f_k(x_t)‖_F of
   every channel of every unit; channels with layer-wise z-score ≥ ``u_prune`` = 2 join
   the final candidates, with the candidate itself.
4. Pruning (sec. 4.4): the final candidates' conv kernels are zeroed, biases kept.

``tac_prune_with_trigger`` is the thesis's "TAC with the true trigger" analysis (app. A.2):
steps 3-4 with a known trigger-application function instead of reconstructed triggers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import surgery
from bdjax.data.dataset import Dataset
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.trigger_reconstruction import (
    ReconstructionConfig,
    apply_tanh_trigger,
    reconstruct_intermediate,
    reconstruct_original,
)
from bdjax.models.base import ConvUnit

TriggerFn = Callable[[jax.Array], jax.Array]  # f32[N, H, W, C] -> f32[N, H, W, C], in [0, 1]


@dataclasses.dataclass(frozen=True)
class TacConfig:
    """Thresholds from the thesis's table 5.2; reconstruction settings in ``reconstruction``.

    u_candidate −2 and u_prune 2 (table 5.2). Z-scores use the unbiased std (ddof 1, as
    ``torch.std``; the thesis does not say). max_candidates: optional cap on how many
    candidates are reconstructed (deepest first), for time budgets; None = all (thesis).
    The epoch counts are flat fields so the CLI can set them (``--set original_epochs=200``).
    """

    u_candidate: float = -2.0
    u_prune: float = 2.0
    max_candidates: int | None = None
    ce_epochs: int = ReconstructionConfig.ce_epochs
    target_epochs: int = ReconstructionConfig.target_epochs
    original_epochs: int = ReconstructionConfig.original_epochs
    intermediate_lr: float = ReconstructionConfig.intermediate_lr
    original_lr: float = ReconstructionConfig.original_lr
    alpha_init: float = ReconstructionConfig.alpha_init

    def __post_init__(self):
        if self.max_candidates is not None and self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0 or None, got {self.max_candidates}")
        self.reconstruction()  # validates the epoch counts

    def reconstruction(self) -> ReconstructionConfig:
        names = {f.name for f in dataclasses.fields(ReconstructionConfig)}
        return ReconstructionConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


# --------------------------------------------------------------------------- measuring
def layer_zscores(values: jax.Array) -> jax.Array:
    """(v − mean) / std within one layer (f32[C]); std with ddof 1; a constant layer gives 0."""
    std = jnp.std(values, ddof=1)
    return jnp.where(std > 0, (values - jnp.mean(values)) / jnp.where(std > 0, std, 1.0), 0.0)


def _frobenius(features):
    """f32[N, h, w, C] -> f32[N, C]: ‖·‖_F of every channel's map."""
    return jnp.sqrt(jnp.sum(jnp.square(features), axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("module", "units"))
def _output_variance(variables, images, *, module, units):
    outputs = surgery.unit_outputs(module, variables, images, units)
    return {name: jnp.var(_frobenius(out), axis=0) for name, out in outputs.items()}


def output_variance(module, variables, images) -> dict[str, jax.Array]:
    """``{unit name: f32[C]}``: var over images of ‖f_k(x)‖_F (sec. 4.1.1). images: f32[N, H, W, C]."""
    return _output_variance(variables, jnp.asarray(images), module=module, units=tuple(module.conv_units()))


def select_candidates(module, variances: Mapping[str, jax.Array], u_candidate: float = TacConfig.u_candidate
                      ) -> list[tuple[ConvUnit, int, float]]:
    """``[(unit, channel, z)]`` with z < ``u_candidate``, deepest unit first (alg. 1), and
    within a unit by ascending z."""
    candidates = []
    for unit in reversed(module.conv_units()):
        z = np.asarray(layer_zscores(jnp.asarray(variances[unit.name])))
        for channel in np.argsort(z, kind="stable"):
            if z[channel] < u_candidate:
                candidates.append((unit, int(channel), float(z[channel])))
    return candidates


@functools.partial(jax.jit, static_argnames=("module", "units"))
def _tac(variables, images, triggered, *, module, units):
    clean = surgery.unit_outputs(module, variables, images, units)
    dirty = surgery.unit_outputs(module, variables, triggered, units)
    return {name: jnp.mean(_frobenius(dirty[name] - clean[name]), axis=0) for name in clean}


def trigger_activated_change(module, variables, images, triggered) -> dict[str, jax.Array]:
    """``{unit name: f32[C]}``: TAC_k = mean_x ‖f_k(x) − f_k(x_t)‖_F (sec. 4.3).

    images, triggered: f32[N, H, W, C], the clean images and the same images triggered.
    """
    images, triggered = jnp.asarray(images), jnp.asarray(triggered)
    if images.shape != triggered.shape:
        raise ValueError(f"triggered images {triggered.shape} must match the clean images {images.shape}")
    return _tac(variables, images, triggered, module=module, units=tuple(module.conv_units()))


def tac_outliers(tac: Mapping[str, jax.Array], u_prune: float = TacConfig.u_prune) -> dict[str, np.ndarray]:
    """``{unit name: bool[C]}``: layer-wise TAC z-score ≥ ``u_prune``."""
    return {name: np.asarray(layer_zscores(jnp.asarray(v)) >= u_prune) for name, v in tac.items()}


def mark_tac_outliers(final: dict[str, np.ndarray], module, variables, images, triggered,
                      u_prune: float = TacConfig.u_prune) -> dict[str, np.ndarray]:
    """Add the TAC outliers of one trigger to ``final`` (``{unit name: bool[C]}``, in place:
    the final-candidate list of alg. 1). Returns the TAC."""
    tac = jax.device_get(trigger_activated_change(module, variables, images, triggered))
    for name, mask in tac_outliers(tac, u_prune).items():
        final[name] |= mask
    return tac


def prune_conv_channels(module, variables, masks: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, list[int]]]:
    """Zero the conv kernels of flagged channels, keeping biases (sec. 4.4).

    masks: ``{unit name: bool[C]}``. Returns ``(new variables, {unit name: channels})``.
    """
    by_name = {u.name: u for u in module.conv_units()}
    pruned = {}
    for name, mask in masks.items():
        channels = [int(c) for c in np.flatnonzero(np.asarray(mask))]
        pruned[name] = channels
        if channels:
            variables = surgery.zero_conv_channels(variables, by_name[name], channels, keep_bias=True)
    return variables, pruned


def check_model_and_clean_set(module, variables, clean: Dataset, method: str):
    check_clean_set(clean, method, min_size=2)  # a variance / z-score needs two images
    if not module.conv_units():
        raise ValueError(f"{method} prunes conv channels; {type(module).__name__} lists no conv units")


# --------------------------------------------------------------------------- oracle (app. A.2)
def tac_prune_with_trigger(module, variables, clean: Dataset, apply_trigger: TriggerFn,
                           u_prune: float = TacConfig.u_prune) -> DefenseResult:
    """Prune the channels whose TAC for a *known* trigger is a layer-wise outlier (app. A.2).

    apply_trigger: f32[N, H, W, C] -> f32[N, H, W, C] (e.g. ``run.attack.apply``).
    """
    check_model_and_clean_set(module, variables, clean, "TAC pruning")
    images = jnp.asarray(clean.floats())
    triggered = apply_trigger(images)
    tac = trigger_activated_change(module, variables, images, triggered)
    new_variables, pruned = prune_conv_channels(module, variables, tac_outliers(tac, u_prune))
    return DefenseResult(new_variables, info={"tac": jax.device_get(tac), "pruned": pruned,
                                              "pruned_count": sum(map(len, pruned.values()))})


# --------------------------------------------------------------------------- the defense
@register("tac", TacConfig, kind="pruning",
          paper="Koldenhof, MSc thesis 2023",
          summary="TAC pruning: reconstruct triggers of low-variance channels, "
          "prune channels with outlying trigger-activated change")
def tac_defense(module, variables, clean: Dataset, key, config: TacConfig = TacConfig()) -> DefenseResult:
    """Algorithm 1 of the thesis. Deterministic (zero-initialised triggers): ``key`` is unused.

    ``info``: candidates, every reconstructed trigger (intermediate and input-space, with
    target, ASR, size, validity), the TAC of each valid trigger, the pruned channels and
    per-stage seconds. ``info["triggers"][i]["perturbation"]`` (f32[H, W, C]) is the
    input-space trigger to plot beside the true one.
    """
    del key
    check_model_and_clean_set(module, variables, clean, "TAC pruning")
    reconstruction = config.reconstruction()
    images, labels = jnp.asarray(clean.floats()), jnp.asarray(clean.labels)
    seconds = {}
    started = time.perf_counter()
    candidates = select_candidates(module, output_variance(module, variables, images), config.u_candidate)
    if config.max_candidates is not None:
        candidates = candidates[:config.max_candidates]
    seconds["candidates"] = time.perf_counter() - started

    final = no_channels(module, variables)
    triggers, tacs = [], []
    seconds["intermediate"] = seconds["original"] = seconds["tac"] = 0.0
    # One unit at a time, deepest first; a candidate already among the final candidates
    # (through an earlier trigger's TAC) is skipped (sec. 4.2.3). Within a unit all
    # remaining candidates run together (vmapped), so none of them skips another.
    for unit in dict.fromkeys(c[0] for c in candidates):
        channels = np.array([c for u, c, _ in candidates if u == unit and not final[u.name][c]], np.int32)
        if channels.size == 0:
            continue
        started = time.perf_counter()
        intermediate = jax.device_get(reconstruct_intermediate(module, variables, images, labels, unit,
                                                               channels, reconstruction))
        seconds["intermediate"] += time.perf_counter() - started
        keep = np.flatnonzero(intermediate.valid)
        found = {int(c): {"unit": unit.name, "channel": int(c), "target": int(intermediate.target[i]),
                          "mean_raise": float(intermediate.raises[i, intermediate.target[i]]),
                          "intermediate_valid": bool(intermediate.valid[i]), "valid": False}
                 for i, c in enumerate(channels)}
        if keep.size:
            started = time.perf_counter()
            selected = jax.tree_util.tree_map(lambda a, keep=keep: a[keep], intermediate)
            original = jax.device_get(reconstruct_original(module, variables, images, labels, unit,
                                                           channels[keep], selected, reconstruction))
            seconds["original"] += time.perf_counter() - started
            for j, i in enumerate(keep):
                found[int(channels[i])].update(
                    valid=bool(original.valid[j]), asr=float(original.asr[j]), size=float(original.size[j]),
                    feature_mse=float(original.feature_mse[j]), t_plus=original.t_plus[j],
                    t_minus=original.t_minus[j], perturbation=np.asarray(original.perturbation[j]))
        started = time.perf_counter()
        for channel, trigger in found.items():
            if not trigger["valid"]:
                continue
            triggered = apply_tanh_trigger(images, trigger["t_plus"], trigger["t_minus"])
            final[unit.name][channel] = True
            tacs.append(mark_tac_outliers(final, module, variables, images, triggered, config.u_prune))
        seconds["tac"] += time.perf_counter() - started
        triggers.extend(found.values())

    new_variables, pruned = prune_conv_channels(module, variables, final)
    return DefenseResult(new_variables, info={
        "candidates": [(u.name, c, z) for u, c, z in candidates],
        # The pipeline's funnel as plain counts (what result tables keep of ``info``).
        "candidate_count": len(candidates),
        "intermediate_valid_count": sum(t["intermediate_valid"] for t in triggers),
        "valid_count": sum(t["valid"] for t in triggers),
        "triggers": triggers,
        "tac": tacs,
        "detected": any(t["valid"] for t in triggers),
        "pruned": pruned,
        "pruned_count": sum(map(len, pruned.values())),
        "seconds": seconds,
    })


def no_channels(module, variables) -> dict[str, np.ndarray]:
    """``{unit name: bool[C]}``, all False: an empty final-candidate list."""
    return {u.name: np.zeros(surgery.get_path(variables["params"], u.conv)["kernel"].shape[-1], bool)
            for u in module.conv_units()}


def reconstruction_mse(images, reconstructed: TriggerFn, true: TriggerFn) -> float:
    """Mean squared pixel difference (in [0, 1] units) between the images triggered by a
    reconstructed trigger and by the true one (our reading of the thesis's table 5.6, which
    does not define its MSE). images: f32[N, H, W, C]."""
    images = jnp.asarray(images)
    return float(jnp.mean(jnp.square(reconstructed(images) - true(images))))
