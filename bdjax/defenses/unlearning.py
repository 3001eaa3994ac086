"""Clean unlearning: gradient ASCENT of cross-entropy on the defender's clean set.

Shared by RNP (Li et al., ICML 2023), which unlearns until clean accuracy <= 0.2 and then
learns neuron masks, and TSBD (stage 1), which unlearns until clean accuracy <= 0.1 and
ranks neurons by how much their weights moved. Both authors' codes run the model in train
mode (BatchNorm normalises with batch statistics and updates its running ones) and clip
the gradient norm at 20 (RNP's ``clip_grad_norm_(..., max_norm=20)``).

Jitted minibatch steps, and after every epoch the eval-mode accuracy on the full clean set,
until the accuracy target or ``max_steps``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.data.dataset import Dataset
from bdjax.training import cross_entropy


def _variables(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_mode_loss(module, params, batch_stats, images, labels):
    """(cross-entropy, updated batch_stats) of a train-mode forward pass. images: f32[B, H, W, C]."""
    if batch_stats:
        logits, updates = module.apply(_variables(params, batch_stats), images, train=True,
                                       mutable=["batch_stats"])
        return cross_entropy(logits, labels), updates["batch_stats"]
    return cross_entropy(module.apply({"params": params}, images, train=True), labels), batch_stats


def accuracy(module, variables, images, labels) -> jax.Array:
    """Eval-mode accuracy, traceable (use inside jit / vmap). images: f32[N, H, W, C]."""
    logits = module.apply(variables, images, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def minibatches(size: int, batch_size: int, epochs: int, key) -> Iterator[np.ndarray]:
    """Index arrays of full batches (one compiled shape), reshuffled every epoch."""
    batch_size = min(batch_size, size)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    for _ in range(epochs):
        order = rng.permutation(size)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def gradient_ascent(module, variables, clean: Dataset, key, *, learning_rate: float, max_accuracy: float,
                    max_steps: int, batch_size: int = 128, momentum: float = 0.9,
                    weight_decay: float = 5e-4, max_grad_norm: float = 20.0) -> tuple[dict, dict]:
    """Maximise cross-entropy on ``clean`` with SGD until its eval-mode accuracy <= ``max_accuracy``.

    Returns ``(unlearned variables, info)`` with ``info["steps"]``, ``info["accuracy"]`` (the
    final clean accuracy), ``info["reached"]`` (whether the target was met within
    ``max_steps``) and ``info["accuracy_curve"]`` (clean accuracy after each epoch).
    """
    if not 0.0 <= max_accuracy <= 1.0:
        raise ValueError(f"max_accuracy must be in [0, 1], got {max_accuracy}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    images, labels = clean.floats(), clean.labels
    optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.add_decayed_weights(weight_decay),
                            optax.sgd(learning_rate, momentum=momentum))

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def negative_loss(params):
            loss, stats = train_mode_loss(module, params, batch_stats, images, labels)
            return -loss, stats

        grads, batch_stats = jax.grad(negative_loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    evaluate = jax.jit(functools.partial(accuracy, module))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = optimizer.init(params)
    acc = float(evaluate(variables, images, labels))
    steps_per_epoch = len(clean) // min(batch_size, len(clean))
    epochs = -(-max_steps // steps_per_epoch)
    curve, steps = [], 0
    # Like the authors' codes, check the clean accuracy once per epoch. (A jitted step in a
    # Python loop: the same loop as one lax.while_loop ran ~15x slower on XLA:CPU.)
    for batch in minibatches(len(clean), batch_size, epochs if acc > max_accuracy else 0, key):
        params, batch_stats, opt_state = step(params, batch_stats, opt_state, images[batch], labels[batch])
        steps += 1
        if steps % steps_per_epoch == 0 or steps == max_steps:
            acc = float(evaluate(_variables(params, batch_stats), images, labels))
            curve.append(acc)
            if acc <= max_accuracy or steps >= max_steps:
                break
    return _variables(params, batch_stats), {"steps": steps, "accuracy": acc, "reached": acc <= max_accuracy,
                                             "accuracy_curve": np.asarray(curve)}
