"""BNA: detection before mitigation by correcting activation distributions (Li et al., sec. 4-5).

1. Detection: reverse-engineer a trigger for every ordered class pair (s, t) on the clean
   images of s (``reverse_engineer``: NC mask+pattern, statistic 1/‖m‖₁, or additive
   perturbation, 1/‖δ‖₂); MAD anomaly scores over all statistics; pairs above ``threshold``
   are detected, their targets T̂. Nothing detected: the model is returned unchanged.
2. For each t ∈ T̂ re-estimate one trigger from the clean images of all its detected sources.
3. BN alignment: only the BatchNorm running mean and std move (``batch_stats``; ``params``
   never change). Minimise Σ_layers Σ_neurons D(p ‖ q), p the soft histogram of the clean
   images' activations in the original model, q that of the triggered images' activations
   with the new statistics (eqs. 3, 5, 6). One new ``batch_stats`` per detected target.
4. Test time: f(x) if f(x) ∉ T̂; otherwise g_t(x), and x is flagged as triggered when
   g_t(x) ≠ t.

The paper's neuron z_{j,l}(x) is a scalar per input; for a conv layer it does not say how a
feature map becomes one. ``neurons="channel"`` (default): one BatchNorm channel is a neuron
and its histogram pools all spatial positions of all images (the BN mean/std are per
channel). ``"position"``: every (position, channel) is a neuron with one sample per image.
Measured with the true trigger on the zoo's GTSRB BadNets models (10 epochs, Adam 0.01,
420 clean images): channel pooling on ResNet-20 takes the rule's ASR 0.998 -> 0.000 and SIA
0.001 -> 0.824 (ACC 0.849 -> 0.835); on medium-bn ASR only 0.995 -> 0.895; "position" on
medium-bn leaves ASR at 0.98 (its ~29k neurons start at TV 0 wherever the trigger does not
reach, and every Adam step on a shared mean/std raises those).
Activations are the BN outputs (``ConvUnit.output``), before the nonlinearity.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import surgery
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.defenses.reverse_engineer import (
    ReverseConfig,
    Trigger,
    as_reverse_config,
    class_bank,
    mad_scores,
    ordered_pairs,
    reverse_engineer,
)
from bdjax.models.inference import predict

DIVERGENCES = ("tv", "js", "kl")
NEURONS = ("position", "channel")
# An edge this far out gives σ(τ(z − e)) = 0 exactly: padding for neurons with fewer bins.
_FAR_EDGE = 1e9


@dataclasses.dataclass(frozen=True)
class BNAConfig:
    """BNA's settings; defaults from the paper (sec. 5.1, appendix 8).

    - ``threshold`` 7 on the MAD anomaly score (3 for WaNet, appendix 8), with the MAD not
      rescaled (``mad_consistency`` 1.0: "absolute deviation divided by MAD"). The default
      does not look at the attack (a defender does not know it): for the paper's WaNet
      setting pass 3 (``bdjax defend bna RUN --set threshold=3``);
    - ``bin_width`` Δb = 0.1 between each neuron's clean min and max, ``tau`` τ = 150;
    - ``divergence`` TV (sec. 5.2), or "js" / "kl" (appendix 10);
    - ``learning_rate`` 0.01 (Adam), ``epochs`` 10; ``batch_size`` is ours (not given).
    ``neurons``: "channel" or "position", what a conv layer's neuron is (module docstring).
    ``reverse``: the pair search (``ReverseConfig``, or a dict of its fields from the CLI);
    its ``kind`` is "patch" for patch triggers, "perturbation" for subtle/global ones.
    ``source_classes``: restrict the pair search to these source classes (None: all; the
    full 43 × 42 GTSRB search is slow on CPU, results say when it was restricted).
    ``align_all_sources``: align on the clean images of every class but t instead of only the
    detected sources Ŝ(t) (the paper's D_t). For an all-to-one attack the two coincide when
    every source is searched; with a restricted search Ŝ(t) is only a sample of the sources.
    ``reestimate_reverse``: the search that re-estimates each detected target's trigger
    (None: ``reverse``, as in the paper). A whole ``ReverseConfig``: fields a dict leaves out
    take ReverseConfig's defaults, not ``reverse``'s (pass ``kind`` again for perturbations).
    E.g. ``{"cost_up": 1.0}`` holds NC's mask cost at ``init_cost`` instead of doubling it, so
    the mask stops growing smaller once the sources flip (experiments/results/bna_tables.md
    measures both; ours, not the paper's, and picked on evaluation ASR: an ablation, not a default).
    """

    threshold: float = 7.0
    mad_consistency: float = 1.0
    bin_width: float = 0.1
    tau: float = 150.0
    divergence: str = "tv"
    learning_rate: float = 0.01
    epochs: int = 10
    batch_size: int = 32
    neurons: str = "channel"
    reverse: ReverseConfig = dataclasses.field(default_factory=ReverseConfig)
    source_classes: tuple[int, ...] | None = None
    align_all_sources: bool = False
    reestimate_reverse: ReverseConfig | dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "reverse", as_reverse_config(self.reverse))
        if self.reestimate_reverse is not None:
            object.__setattr__(self, "reestimate_reverse", as_reverse_config(self.reestimate_reverse))
        if self.source_classes is not None:
            object.__setattr__(self, "source_classes", tuple(int(s) for s in self.source_classes))
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.neurons not in NEURONS:
            raise ValueError(f"neurons must be one of {NEURONS}, got {self.neurons!r}")
        if self.bin_width <= 0 or self.tau <= 0:
            raise ValueError("bin_width and tau must be positive")


# --------------------------------------------------------------------------- detection
@dataclasses.dataclass
class Detection:
    """The pair search and its MAD verdict (NumPy)."""

    pairs: np.ndarray  # int32[P, 2] (source, target)
    norms: np.ndarray  # f32[P] trigger size per pair
    statistics: np.ndarray  # f32[P] 1 / norm
    scores: np.ndarray  # f64[P] MAD anomaly score of the statistic
    detected: np.ndarray  # bool[P] score > threshold

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(sorted({int(t) for t in self.pairs[self.detected, 1]}))

    def sources(self, target: int) -> tuple[int, ...]:
        chosen = self.detected & (self.pairs[:, 1] == target)
        return tuple(int(s) for s in self.pairs[chosen, 0])

    def summary(self) -> dict:
        order = np.argsort(-self.scores)[:5]
        return {"pairs_searched": len(self.pairs), "detected_pairs": self.pairs[self.detected].tolist(),
                "targets": list(self.targets),
                "top_pairs": [{"pair": self.pairs[i].tolist(), "score": float(self.scores[i]),
                               "norm": float(self.norms[i])} for i in order]}


def detect(module, variables, clean: Dataset, key, config: BNAConfig = BNAConfig()) -> Detection:
    """Reverse-engineer every ordered pair (s, t), s ∈ ``config.source_classes``; MAD-score them."""
    num_classes = clean.info.num_classes
    pairs = ordered_pairs(num_classes, config.source_classes)
    sources = np.unique(pairs[:, 0])
    bank = class_bank(clean, sources)
    bank_index = np.searchsorted(sources, pairs[:, 0])
    found = reverse_engineer(module, variables, bank, bank_index, pairs[:, 1], key, config.reverse)
    scores = mad_scores(found.statistic, config.mad_consistency)
    return Detection(pairs, found.norm, found.statistic, scores, scores > config.threshold)


def reestimate(module, variables, clean: Dataset, sources, target: int, key, config: ReverseConfig,
               restarts: int = 1) -> Trigger:
    """One trigger for ``target`` from the clean images of all its detected ``sources``.

    ``restarts`` > 1: that many searches with different keys, vmapped in one program; the
    result is a stack (leaves with a leading [restarts] axis) that ``Trigger.stamp`` applies
    in turn.
    """
    chosen = np.isin(clean.labels, np.asarray(sources))
    if not chosen.any():
        raise ValueError(f"the clean set has no image of the sources {list(sources)}")
    bank = to_float(clean.images[chosen])[None]
    found = reverse_engineer(module, variables, bank, np.zeros(restarts, np.int32), np.full(restarts, target), key,
                             dataclasses.replace(config, chunk_size=restarts))
    trigger = found.trigger if restarts > 1 else found.trigger.take(0)
    return jax.tree_util.tree_map(jnp.asarray, trigger)


# --------------------------------------------------------------------------- soft histograms
def histogram_edges(low, high, bin_width: float = 0.1) -> np.ndarray:
    """Interior bin edges per neuron: f32[J, K].

    low, high: f[J] each neuron's clean min and max. Neuron j has M_j = ⌈(high − low)/Δb⌉
    intervals (−∞, b₁), [b₁, b₂), …, [b_{M−1}, ∞) with b_i = low + i·Δb; K = max_j M_j − 1
    and the unused edges of shorter neurons lie far out (their bins stay empty).
    """
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    bins = np.maximum(np.ceil((high - low) / bin_width), 1).astype(np.int64)
    width = max(int(bins.max()) - 1, 1)
    steps = np.arange(1, width + 1)
    edges = low[:, None] + steps[None, :] * bin_width
    return np.where(steps[None, :] < bins[:, None], edges, _FAR_EDGE).astype(np.float32)


def soft_histogram(values, edges, tau: float, bin_width: float):
    """Soft histogram per neuron (eqs. 5-6): f32[J, K + 1], rows sum to 1 (mean over samples).

    values: f32[S, J]; edges: f32[J, K] from ``histogram_edges`` with the same ``bin_width``.
    With τ·Δb = 15 (the paper's 150 · 0.1) a value puts mass above 3e-7 only in its own bin
    and the two next to it, so only those three are computed (S·J·3 sigmoids, then a
    scatter-add); the result equals the all-edges form (P(I_i) = σ(τ(z − b_{i−1})) − σ(τ(z − b_i))
    for every bin, tests/test_bna.py) to ~1e-6 for τ·Δb ≥ 10.
    """
    count = (jnp.sum(edges < _FAR_EDGE / 2, axis=1) + 1)[None, :]  # [1, J] M_j, the bins neuron j uses
    low = (edges[:, 0] - bin_width)[None, :]  # [1, J] b_0 (edges[:, 0] = b_1 is finite whenever M_j > 1)
    width = edges.shape[1] + 1
    home = jnp.clip(jnp.floor((values - low) / bin_width), 0, count - 1).astype(jnp.int32)  # [S, J]

    def above(i):  # σ(τ(z − b_i)) for bin index i: [S, J], 1 below the first bin, 0 above the last
        s = jax.nn.sigmoid(tau * (values - (low + i * bin_width)))
        return jnp.where(i <= 0, 1.0, jnp.where(i >= count, 0.0, s))

    bins = jnp.stack([home - 1, home, home + 1], axis=-1)  # [S, J, 3]
    mass = jnp.stack([above(bins[..., d]) - above(bins[..., d] + 1) for d in range(3)], axis=-1)
    valid = (bins >= 0) & (bins < count[..., None])
    neuron = jnp.arange(values.shape[1])[None, :, None]
    flat = jnp.where(valid, neuron * width + bins, 0).reshape(-1)
    hist = jnp.zeros(values.shape[1] * width, values.dtype).at[flat].add(jnp.where(valid, mass, 0.0).reshape(-1))
    return hist.reshape(values.shape[1], width) / values.shape[0]


def divergence(p, q, kind: str = "tv", eps: float = 1e-10):
    """D(p ‖ q) over the last axis: TV ½Σ|p − q|, KL Σ p log(p/q), JS ½KL(p‖m) + ½KL(q‖m)."""
    if kind == "tv":
        return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
    if kind == "kl":
        return jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1)
    if kind == "js":
        m = 0.5 * (p + q)
        return 0.5 * divergence(p, m, "kl", eps) + 0.5 * divergence(q, m, "kl", eps)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def _neuron_values(out, neurons: str):
    """A unit's BN outputs f32[N, h, w, C] as samples x neurons.

    "position": every (position, channel) is a neuron, sampled once per image -> [N, h·w·C];
    "channel": a channel is one neuron and every position a sample of it -> [N·h·w, C].
    """
    if neurons == "position":
        return out.reshape((out.shape[0], -1))
    if neurons == "channel":
        return out.reshape((-1, out.shape[-1]))
    raise ValueError(f"neurons must be one of {NEURONS}, got {neurons!r}")


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _unit_values(module, variables, images, units, neurons):
    outputs = surgery.unit_outputs(module, variables, images, units)
    return {name: _neuron_values(out, neurons) for name, out in outputs.items()}


def _batches(images, size: int = 256):
    for start in range(0, len(images), size):
        yield jnp.asarray(images[start:start + size])


def activation_ranges(module, variables, images, units, neurons: str = "channel") -> dict:
    """{unit name: (min f32[J], max f32[J])} of the BN outputs over ``images`` (f32[N, H, W, C])."""
    low, high = {}, {}
    for batch in _batches(images):
        for name, values in jax.device_get(_unit_values(module, variables, batch, units, neurons)).items():
            low[name] = np.minimum(low.get(name, np.inf), values.min(axis=0))
            high[name] = np.maximum(high.get(name, -np.inf), values.max(axis=0))
    return {name: (low[name], high[name]) for name in low}


def clean_edges(module, variables, images, units, bin_width: float = 0.1, neurons: str = "channel") -> dict:
    """{unit name: f32[J, K]} histogram edges between each neuron's min and max over clean ``images``."""
    ranges = activation_ranges(module, variables, images, units, neurons)
    return {name: jnp.asarray(histogram_edges(low, high, bin_width)) for name, (low, high) in ranges.items()}


@functools.partial(jax.jit, static_argnums=(0, 3, 5, 6, 7))
def _histogram_sums(module, variables, images, units, edges, tau, bin_width, neurons):
    values = _unit_values(module, variables, images, units, neurons)
    return {name: (soft_histogram(v, edges[name], tau, bin_width) * v.shape[0], v.shape[0])
            for name, v in values.items()}


def soft_histograms(module, variables, images, units, edges, tau: float = 150.0, bin_width: float = 0.1,
                    neurons: str = "channel") -> dict:
    """{unit name: f32[J, K + 1]} soft histograms of the BN outputs over all ``images``."""
    sums, counts = {}, {}
    for batch in _batches(images, 64):
        for name, (total, count) in _histogram_sums(module, variables, batch, units, edges, tau, bin_width,
                                                    neurons).items():
            sums[name] = total + sums.get(name, 0.0)
            counts[name] = count + counts.get(name, 0)
    return {name: sums[name] / counts[name] for name in sums}


def layer_divergences(p: dict, q: dict, kind: str) -> dict:
    """{unit name: Σ_neurons D(p ‖ q)}."""
    return {name: float(jnp.sum(divergence(p[name], q[name], kind))) for name in p}


def divergence_table(module, variables, clean_images, triggered_images, edges, tau: float = 150.0,
                     aligned_stats=None, neurons: str = "channel") -> dict:
    """The paper's table 13 per BN layer: {kind: {unit: Σ_neurons D(p_clean ‖ q_triggered)}}.

    p: histograms of ``clean_images`` in the model ``variables``; q: of ``triggered_images`` in
    the same model, or, with ``aligned_stats``, in g_t (the model with those ``batch_stats``),
    which is what BNA's alignment minimises. ``edges``: from ``clean_edges`` on ``variables``.
    """
    units = surgery.bn_units(module)
    p = soft_histograms(module, variables, clean_images, units, edges, tau, neurons=neurons)
    triggered_model = variables if aligned_stats is None else {**variables, "batch_stats": aligned_stats}
    q = soft_histograms(module, triggered_model, triggered_images, units, edges, tau, neurons=neurons)
    return {kind: layer_divergences(p, q, kind) for kind in DIVERGENCES}


# --------------------------------------------------------------------------- BN alignment
def _stats_to_theta(batch_stats):
    """The optimised parameters: BN running mean and std (the 'var' slot holds std)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.sqrt(x) if path[-1].key == "var" else x, batch_stats)


class _AlignSettings(typing.NamedTuple):
    """The alignment's static settings (hashable: a jit static argument)."""

    tau: float
    bin_width: float
    neurons: str
    divergence: str
    learning_rate: float

    @classmethod
    def of(cls, config: BNAConfig) -> _AlignSettings:
        return cls(config.tau, config.bin_width, config.neurons, config.divergence, config.learning_rate)


def _theta_to_stats(theta):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.square(jnp.maximum(x, 1e-3)) if path[-1].key == "var" else x, theta)


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _align_step(module, variables, images, trigger, edges, theta, opt_state, indices, units, config):
    """One Adam step on (mean, std) of every BN, on the minibatch ``images[indices]``.

    It compares the minibatch's clean histograms in the original model with the same images'
    triggered histograms under the new statistics (both sides from the same images, so
    sampling noise does not enter the divergence). The steps are a Python loop, not a
    ``lax.scan``: see ``bdjax.loops`` on XLA:CPU convolutions in while loops.
    """
    histogram = functools.partial(soft_histogram, tau=config.tau, bin_width=config.bin_width)
    batch = images[indices]

    def loss_fn(theta):
        clean = _unit_values(module, variables, batch, units, config.neurons)
        stats = _theta_to_stats(theta)
        values = _unit_values(module, {**variables, "batch_stats": stats}, trigger.stamp(batch), units, config.neurons)
        return sum(jnp.sum(divergence(jax.lax.stop_gradient(histogram(clean[name], edges[name])),
                                      histogram(v, edges[name]), config.divergence))
                   for name, v in values.items())

    loss, grads = jax.value_and_grad(loss_fn)(theta)
    updates, opt_state = optax.adam(config.learning_rate).update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss


def align_batch_stats(module, variables, images, trigger: Trigger, edges: dict, key,
                      config: BNAConfig = BNAConfig()) -> tuple[dict, np.ndarray]:
    """New ``batch_stats`` aligning the triggered images' BN-output histograms to the clean ones.

    images: f32[N, H, W, C] clean images of the detected sources; edges: {unit name: f32[J, K]}.
    Returns (batch_stats, per-step loss f32[steps]); ``variables["params"]`` is not touched.
    """
    surgery.require_batch_norm(variables, "BNA")
    units = surgery.bn_units(module)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"BN alignment needs clean images f32[N, H, W, C], got shape {images.shape}")
    batch = min(config.batch_size, len(images))
    per_epoch = len(images) // batch
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    order = np.concatenate([rng.permutation(len(images))[:per_epoch * batch].reshape(per_epoch, batch)
                            for _ in range(config.epochs)]).astype(np.int32)
    settings = _AlignSettings.of(config)
    theta = _stats_to_theta(variables["batch_stats"])
    opt_state = optax.adam(config.learning_rate).init(theta)
    images, losses = jnp.asarray(images), []
    for indices in order:  # Adam on (mean, std) of every BN, one step per row of ``order``
        theta, opt_state, loss = _align_step(module, variables, images, trigger, edges, theta, opt_state,
                                             jnp.asarray(indices), units, settings)
        losses.append(loss)
    return _theta_to_stats(theta), np.asarray(jnp.stack(losses))


# --------------------------------------------------------------------------- test-time rule
def mitigated_predict(module, variables, aligned: dict, images) -> tuple[np.ndarray, np.ndarray]:
    """The paper's inference rule (sec. 4.2, Fig. 2) on uint8[N, H, W, C] images.

    aligned: {target t: batch_stats of g_t}. Returns (predictions int32[N], flagged bool[N]):
    f(x) unless f(x) = t ∈ T̂, then g_t(x), flagged when g_t(x) ≠ t.
    """
    pred = predict(module, variables, images)
    out, flagged = pred.copy(), np.zeros(pred.shape, bool)
    for target, stats in aligned.items():
        chosen = np.flatnonzero(pred == target)
        if chosen.size:
            second = predict(module, {**variables, "batch_stats": stats}, np.asarray(images)[chosen])
            out[chosen] = second
            flagged[chosen] = second != target
    return out, flagged


def rule_rates(module, variables, aligned: dict, sets) -> dict:
    """ACC / ASR / SIA of the paper's rule (flagged inputs keep g_t(x)) on ``sets`` (``TestSets``),
    and its detector: ``tpr`` = flagged triggered inputs, ``fpr_target`` = flagged clean inputs
    among those with f(x) a detected target (the paper's table 8), ``fpr_all`` over all clean ones.
    Without triggered inputs (a clean model's sets) ``asr``, ``sia`` and ``tpr`` are NaN.
    """
    clean_pred, clean_flag = mitigated_predict(module, variables, aligned, sets.clean.images)
    at_target = np.isin(predict(module, variables, sets.clean.images), list(aligned))
    rates = {"acc": np.mean(clean_pred == sets.clean.labels),
             "fpr_target": clean_flag[at_target].mean() if at_target.any() else float("nan"),
             "fpr_all": clean_flag.mean()}
    if not len(sets.triggered):  # a clean model (no attack): only the rule's cost on clean inputs
        return {**rates, "asr": float("nan"), "sia": float("nan"), "tpr": float("nan")}
    trig_pred, trig_flag = mitigated_predict(module, variables, aligned, sets.triggered.images)
    return {**rates, "asr": np.mean(trig_pred == sets.targets), "sia": np.mean(trig_pred == sets.triggered.labels),
            "tpr": trig_flag.mean()}


# --------------------------------------------------------------------------- the defense
@register("bna", BNAConfig, kind="detector",
          paper="Li, Xiang, Miller & Kesidis (correcting activation distributions)",
          detector=True,
          summary="detect by pair-wise trigger reverse engineering, then align BN mean/std (params untouched)")
def bna(module, variables, clean: Dataset, key, config: BNAConfig = BNAConfig()) -> DefenseResult:
    """BNA. Returns the original variables and, when a backdoor is detected, the test-time
    rule as ``classifier``: flagged inputs (g_t(x) ≠ t) are reported as rejected, so the
    evaluation's TPR/FPR are the detector's. The rule's own predictions (the paper's SIA)
    come from ``mitigated_predict`` with ``info["aligned"]``.
    """
    check_clean_set(clean, "BNA", min_size=2)
    surgery.require_batch_norm(variables, "BNA")
    detect_key, estimate_key, align_key = jax.random.split(key, 3)
    started = time.perf_counter()
    detection = detect(module, variables, clean, detect_key, config)
    info: dict = {"detection": detection.summary(), "detect_seconds": time.perf_counter() - started,
                  "detection_result": detection}
    if not detection.targets:
        info["aligned"] = {}
        return DefenseResult(variables, info=info)

    units = surgery.bn_units(module)
    edges = clean_edges(module, variables, to_float(clean.images), units, config.bin_width, config.neurons)
    aligned, triggers, losses = {}, {}, {}
    for target in detection.targets:
        sources = detection.sources(target)
        trigger = reestimate(module, variables, clean, sources, target, jax.random.fold_in(estimate_key, target),
                             config.reestimate_reverse or config.reverse)
        align_classes = np.setdiff1d(np.arange(clean.info.num_classes), [target]) if config.align_all_sources \
            else np.asarray(sources)
        images = to_float(clean.images[np.isin(clean.labels, align_classes)])
        stats, loss = align_batch_stats(module, variables, images, trigger, edges,
                                        jax.random.fold_in(align_key, target), config)
        aligned[target], triggers[target], losses[target] = stats, trigger, loss.tolist()
    info.update(aligned=aligned, triggers=triggers, alignment_loss=losses, edges=edges,
                seconds=time.perf_counter() - started)

    def classify(images):
        return mitigated_predict(module, variables, aligned, images)

    return DefenseResult(variables, classifier=classify, info=info)
