"""I-BAU: adversarial unlearning of backdoors via implicit hypergradient (Zeng et al., ICLR 2022).

min_θ L_out(δ*(θ), θ) with δ*(θ) = argmax_δ L_in(δ, θ): the inner problem finds one universal
perturbation that most damages the model (the stand-in for an unknown trigger); the outer step
trains θ to classify perturbed clean images correctly. δ* depends on θ, so the gradient of the
outer loss has an implicit part. With the fixed-point map Φ(δ, θ) = δ − α∇_δ L_in(δ, θ)
(δ* = Φ(δ*, θ)) the hypergradient is

    ∇_θ L_out + (∂Φ/∂θ)ᵀ v,   v = Σ_{k<K} (∂Φ/∂δ)ᵀᵏ ∇_δ L_out     (K fixed-point iterations),

computed here with ``jax.vjp`` (the authors use the ``hypergrad`` package; jaxopt is unmaintained).
Per round: δ from one pass of SGD ascent over the clean set (CE against the model's own
predictions, − ``regularization``·‖δ‖²), projected into the L2 ball of ``radius``; then one
hypergradient Adam step per clean batch. BatchNorm runs in eval mode throughout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import loops
from bdjax.data.dataset import Dataset, to_float
from bdjax.defenses.base import DefenseResult, check_clean_set, register
from bdjax.training import cross_entropy


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
    """I-BAU; defaults from the authors' code and SPEC "Baselines".

    ``rounds`` 5, ``fixed_point_steps`` K = 5, outer Adam ``learning_rate`` 1e-4 (SPEC);
    inner fixed-point map step α = ``inner_step`` 0.1, δ found by SGD with lr
    ``perturbation_learning_rate`` 10, ``regularization`` 1e-3·‖δ‖², L2 ``radius`` 10;
    ``portion`` of each outer batch carries δ (the authors' 0.01; at least one image);
    ``batch_size`` is ours.
    """

    rounds: int = 5
    fixed_point_steps: int = 5
    learning_rate: float = 1e-4
    inner_step: float = 0.1
    perturbation_learning_rate: float = 10.0
    regularization: float = 1e-3
    radius: float = 10.0
    portion: float = 0.01
    batch_size: int = 64

    def __post_init__(self):
        if self.rounds < 0 or self.fixed_point_steps < 1 or self.batch_size < 1:
            raise ValueError("rounds must be >= 0, fixed_point_steps and batch_size >= 1")


def implicit_hypergradient(inner_loss, outer_loss, delta, params, steps: int, inner_step: float):
    """Hypergradient of ``outer_loss(δ, θ)`` w.r.t. θ at the fixed point δ of Φ = δ − α∇_δ inner_loss.

    v_{k+1} = (∂Φ/∂δ)ᵀ v_k + ∇_δ L_out (v_0 = 0, ``steps`` iterations); returns
    ∇_θ L_out + (∂Φ/∂θ)ᵀ v. Pure and jit-compatible.
    """
    grad_delta, grad_params = jax.grad(outer_loss, argnums=(0, 1))(delta, params)

    def fixed_point_map(delta, params):
        return jax.tree_util.tree_map(lambda d, g: d - inner_step * g, delta,
                                      jax.grad(inner_loss, argnums=0)(delta, params))

    _, pullback = jax.vjp(fixed_point_map, delta, params)

    def iterate(v, _):
        return jax.tree_util.tree_map(jnp.add, pullback(v)[0], grad_delta), None

    # Unrolled: a while loop here would run the convolutions' backward slowly on CPU (bdjax.loops).
    v, _ = jax.lax.scan(iterate, jax.tree_util.tree_map(jnp.zeros_like, grad_delta), None, length=steps,
                        unroll=True)
    return jax.tree_util.tree_map(jnp.add, grad_params, pullback(v)[1])


def _perturbed(images, delta, count: int):
    """The first ``count`` images get δ added (the batch is already shuffled)."""
    chosen = (jnp.arange(images.shape[0]) < count).reshape(-1, 1, 1, 1)
    return images + jnp.where(jnp.broadcast_to(chosen, images.shape), jnp.broadcast_to(delta, images.shape), 0.0)


def _round(module, variables, opt_state, images, labels, config: IBAUConfig):
    """One I-BAU round over ``images`` f32[steps, B, H, W, C] / ``labels`` int32[steps, B]:
    ``ascend`` over every batch, then ``unlearn`` on every batch, each in ``bdjax.loops.scan``
    (compiled once per model, config and shape, so later rounds and calls reuse it)."""
    batch_stats = variables.get("batch_stats")
    delta, _ = loops.scan(functools.partial(ascend, module=module, config=config),
                          jnp.zeros(images.shape[2:], jnp.float32), (images, labels), consts=variables)
    delta = delta * jnp.minimum(1.0, config.radius / jnp.maximum(jnp.linalg.norm(delta), 1e-12))
    count = max(1, round(config.portion * images.shape[1]))
    step = functools.partial(unlearn, module=module, config=config, count=count)
    (params, opt_state), losses = loops.scan(step, (variables["params"], opt_state), (images, labels),
                                             consts=(variables, delta, images[0], labels[0]))
    new = {**variables, "params": params}
    if batch_stats is not None:
        new["batch_stats"] = batch_stats
    return new, opt_state, delta, losses


def _adversary_loss(delta, params, x, y, *, module, variables, config: IBAUConfig):
    logits = module.apply({**variables, "params": params}, x + jnp.broadcast_to(delta, x.shape), train=False)
    return -cross_entropy(logits, y) + config.regularization * jnp.sum(jnp.square(delta))


def ascend(variables, delta, batch, *, module, config: IBAUConfig):
    """One SGD ascent step of the universal perturbation δ on ``batch = (x, _)``, against the
    model's own predictions."""
    x, _ = batch
    own = jnp.argmax(module.apply(variables, x, train=False), -1)
    grad = jax.grad(_adversary_loss)(delta, variables["params"], x, own, module=module, variables=variables,
                                     config=config)
    return delta - config.perturbation_learning_rate * grad, None


def unlearn(data, carry, batch, *, module, config: IBAUConfig, count: int):
    """One hypergradient Adam step: ``data = (variables, δ, the inner loss's images and labels)``
    (the authors' inner loss: the first batch, true labels), ``carry = (params, Adam state)``,
    ``batch = (x, y)``. Returns the outer loss before the step."""
    variables, delta, inner_x, inner_y = data
    params, opt_state = carry
    x, y = batch

    def inner_loss(delta, params):
        return _adversary_loss(delta, params, inner_x, inner_y, module=module, variables=variables, config=config)

    def outer_loss(delta, params):
        return cross_entropy(module.apply({**variables, "params": params}, _perturbed(x, delta, count), train=False), y)

    grads = implicit_hypergradient(inner_loss, outer_loss, delta, params, config.fixed_point_steps, config.inner_step)
    updates, opt_state = optax.adam(config.learning_rate).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), outer_loss(delta, params)


@register("ibau", IBAUConfig, kind="unlearning",
          paper="Zeng et al., ICLR 2022",
          summary="I-BAU: minimax unlearning with an implicit hypergradient")
def ibau(module, variables, clean: Dataset, key, config: IBAUConfig = IBAUConfig()) -> DefenseResult:
    """Run ``config.rounds`` I-BAU rounds on ``clean``; returns the unlearned variables."""
    check_clean_set(clean, "I-BAU", min_size=2)
    batch = min(config.batch_size, len(clean))
    steps = len(clean) // batch
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    opt_state = optax.adam(config.learning_rate).init(variables["params"])
    images_all = to_float(clean.images)
    norms, losses = [], []
    for _ in range(config.rounds):
        order = rng.permutation(len(clean))[:steps * batch].reshape(steps, batch)
        variables, opt_state, delta, loss = _round(module, variables, opt_state, jnp.asarray(images_all[order]),
                                                   jnp.asarray(clean.labels[order]), config)
        norms.append(float(jnp.linalg.norm(delta)))
        losses.append(np.asarray(loss).tolist())
    return DefenseResult(variables, info={"perturbation_norms": norms, "outer_losses": losses})
