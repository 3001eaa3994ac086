"""Training: the jitted, vmapped trainer learns a learnable task, M keys give M different
models each equal to the one ``train`` gives for that key, augmentation does what it says,
and configurations are validated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.data.dataset import Dataset, to_float
from bdjax.models import batched_logits, create, predict
from bdjax.training import TrainConfig, augment, make_optimizer, train, train_many, unstack_models

# Where the bright 4x4 square sits for each of the 4 classes (top-left corner, row/col).
SQUARE_CORNERS = ((4, 4), (4, 24), (24, 4), (24, 24))
CONFIG = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, crop_padding=0, flip=False)


def square_position_task(info, n: int = 256, seed: int = 0) -> Dataset:
    """n dim random images; the label is the position of the one bright 4x4 square."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 100, (n, *info.image_shape), dtype=np.uint8)
    labels = rng.integers(0, len(SQUARE_CORNERS), n)
    for image, label in zip(images, labels):
        row, col = SQUARE_CORNERS[label]
        image[row:row + 4, col:col + 4] = 255
    return Dataset(images, labels, info)


@pytest.fixture(scope="module")
def task(info):
    return square_position_task(info)


@pytest.fixture(scope="module")
def trained(info, task):
    """(module, train_many over 3 keys, train with the second key): trained once per module."""
    module = create("small-bn", info)
    keys = jax.random.split(jax.random.key(0), 3)
    many = train_many(module, task, CONFIG, keys, progress=False)
    single = train(module, task, CONFIG, keys[1], progress=False)
    return module, many, single


def test_small_bn_learns_the_square_position_task_in_two_epochs(trained, task):
    module, _, single = trained
    assert len(single.history) == CONFIG.epochs
    assert single.history[-1]["loss"] < single.history[0]["loss"]
    train_accuracy = np.mean(predict(module, single.variables, task.images) == task.labels)
    assert train_accuracy > 0.9


def test_train_many_trains_one_different_model_per_key(trained, task):
    module, many, _ = trained
    assert all(h["accuracy"].shape == (3,) and h["loss"].shape == (3,) for h in many.history)
    for leaf in jax.tree_util.tree_leaves(many.variables):
        assert leaf.shape[0] == 3
    models = unstack_models(many.variables, 3)
    kernels = [np.asarray(m["params"]["conv0"]["kernel"]) for m in models]
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    for variables in models:
        assert np.mean(predict(module, variables, task.images) == task.labels) > 0.9


def test_bfloat16_compute_learns_the_task_and_keeps_float32_state(trained, task):
    """Mixed precision: the same task learnt with the network in bfloat16, while parameters,
    BN statistics and optimizer state stay float32, and the weights differ from fp32's."""
    module, _, single = trained
    config = TrainConfig(**{**CONFIG.__dict__, "compute_dtype": "bfloat16"})
    low = train(module, task, config, jax.random.split(jax.random.key(0), 3)[1], progress=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(low.variables))
    assert np.isfinite(low.history[-1]["loss"]) and low.history[-1]["loss"] < low.history[0]["loss"]
    assert np.mean(predict(module, low.variables, task.images) == task.labels) > 0.9
    kernel, kernel32 = (np.asarray(v["params"]["conv0"]["kernel"]) for v in (low.variables, single.variables))
    assert not np.array_equal(kernel, kernel32) and np.allclose(kernel, kernel32, atol=0.05)


def test_each_model_of_train_many_is_the_model_train_gives_for_its_key(trained, task):
    # Same key -> same init, data order and augmentation; only vmap's batching of the
    # arithmetic differs, so the two agree to float round-off ...
    module, many, single = trained
    member = unstack_models(many.variables, 3)[1]
    np.testing.assert_allclose([h["loss"][1] for h in many.history],
                               [h["loss"] for h in single.history], rtol=1e-4)
    # ... except where round-off is all there is: a conv bias right before a BatchNorm has
    # an exactly-zero true gradient (BN subtracts the batch mean), so Adam turns round-off
    # into full-size steps there, and the BN running mean follows that bias. In train mode
    # the two cancel exactly (same losses, above); in eval mode the running mean lags the
    # drifting bias a little, so eval logits agree only loosely.
    member_logits = batched_logits(module, member, task.images[:64])
    single_logits = batched_logits(module, single.variables, task.images[:64])
    np.testing.assert_allclose(member_logits, single_logits, rtol=0, atol=0.1)
    np.testing.assert_array_equal(member_logits.argmax(-1), single_logits.argmax(-1))
    bn_absorbed = {("params", f"conv{i}", "bias") for i in range(4)} | {
        ("batch_stats", f"bn{i}", "mean") for i in range(4)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(member):
        if tuple(k.key for k in path) not in bn_absorbed:
            np.testing.assert_allclose(leaf, _get(single.variables, path), rtol=1e-4, atol=1e-5,
                                       err_msg=jax.tree_util.keystr(path))


def _get(tree, key_path):
    for key in key_path:
        tree = tree[key.key]
    return tree


def test_train_refuses_a_dataset_smaller_than_one_batch(info, task):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(create("small", info), task.subset(np.arange(8)), CONFIG, jax.random.key(0),
              progress=False)


# --- augmentation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch():
    return jnp.asarray(to_float(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3),
                                                                  dtype=np.uint8)))


def test_augment_without_crop_or_flip_is_the_identity(batch):
    np.testing.assert_array_equal(augment(jax.random.key(0), batch, 0, False), batch)


@pytest.mark.parametrize("crop_padding, flip", [(4, False), (0, True), (4, True)])
def test_augment_keeps_the_shape_and_moves_or_mirrors_each_image(batch, crop_padding, flip):
    out = np.asarray(augment(jax.random.key(1), batch, crop_padding, flip))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    p = crop_padding
    padded = np.pad(np.asarray(batch), ((0, 0), (p, p), (p, p), (0, 0)))
    for original, augmented in zip(padded, out):
        candidates = [original[dy:dy + 32, dx:dx + 32] for dy in range(2 * p + 1)
                      for dx in range(2 * p + 1)]
        if flip:
            candidates += [c[:, ::-1] for c in candidates]
        assert any(np.array_equal(augmented, c) for c in candidates)


def test_augment_draws_a_different_crop_per_image():
    # Identical inputs: with per-image offsets they come out different.
    ramp = jnp.broadcast_to(jnp.arange(32, dtype=jnp.float32).reshape(1, 1, 32, 1) / 32,
                            (8, 32, 32, 3))
    out = np.asarray(augment(jax.random.key(2), ramp, 4, False))
    assert len({o.tobytes() for o in out}) > 1


# --- configuration -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(optimizer="rmsprop"), dict(schedule="linear"),
                                 dict(epochs=-1), dict(batch_size=0), dict(compute_dtype="float16")])
def test_train_config_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_backdoorbench_recipe_is_sgd_with_momentum_weight_decay_and_cosine():
    config = TrainConfig.backdoorbench()
    assert (config.optimizer, config.learning_rate, config.momentum, config.weight_decay,
            config.schedule, config.epochs) == ("sgd", 0.01, 0.9, 5e-4, "cosine", 100)


def learning_rates(config: TrainConfig, total_steps: int) -> np.ndarray:
    """The step sizes the optimizer takes for a constant gradient of 1 (SGD without momentum)."""
    optimizer = make_optimizer(config, total_steps)
    params = jnp.zeros((), jnp.float32)

    def step(state, _):
        updates, state = optimizer.update(jnp.ones((), jnp.float32), state, params)
        return state, -updates

    return np.asarray(jax.lax.scan(step, optimizer.init(params), length=total_steps)[1])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_every_optimizer_and_schedule_builds_and_updates(optimizer, schedule):
    config = TrainConfig(optimizer=optimizer, schedule=schedule, weight_decay=5e-4)
    opt = make_optimizer(config, total_steps=10)
    params = {"w": jnp.ones((3,), jnp.float32)}
    updates, _ = opt.update({"w": jnp.ones((3,), jnp.float32)}, opt.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0)


def test_step_schedule_divides_the_learning_rate_by_ten_at_half_and_three_quarters():
    lrs = learning_rates(TrainConfig(optimizer="sgd", momentum=0.0, learning_rate=0.1,
                                     schedule="step"), total_steps=100)
    np.testing.assert_allclose(lrs[[0, 49, 50, 74, 75, 99]],
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


def test_cosine_schedule_starts_at_the_learning_rate_and_decays_to_zero():
    lrs = learning_rates(TrainConfig(optimizer="sgd", momentum=0.0, learning_rate=0.1,
                                     schedule="cosine"), total_steps=100)
    np.testing.assert_allclose(lrs[[0, 50]], [0.1, 0.05], rtol=1e-5)
    assert np.all(np.diff(lrs) <= 0) and lrs[-1] < 1e-3



def test_warmup_cosine_rises_linearly_to_the_peak_then_decays_to_zero():
    lrs = learning_rates(TrainConfig(optimizer="sgd", momentum=0.0, learning_rate=0.1, schedule="cosine",
                                     warmup_fraction=0.1), total_steps=100)
    np.testing.assert_allclose(lrs[[0, 5, 10]], [0.0, 0.05, 0.1], rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] < 1e-4


def test_nesterov_momentum_changes_the_update():
    grads, params = {"w": jnp.ones((2,))}, {"w": jnp.zeros((2,))}
    updates = []
    for nesterov in (False, True):
        opt = make_optimizer(TrainConfig(optimizer="sgd", learning_rate=0.1, nesterov=nesterov), 10)
        updates.append(opt.update(grads, opt.init(params), params)[0]["w"])
    # First step: plain momentum moves by lr * g, Nesterov by lr * (1 + momentum) * g.
    np.testing.assert_allclose(updates[0], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates[1], -0.19, rtol=1e-6)


# --- resumable training ------------------------------------------------------------------

class _Killed(Exception):
    pass


def _kill_after(epochs: int):
    def on_epoch(epoch, metrics):
        if epoch + 1 == epochs:
            raise _Killed
    return on_epoch


def test_a_killed_and_resumed_training_ends_bit_identical_to_an_uninterrupted_one(info, task, tmp_path):
    """Checkpoint after every epoch (params, BN state, optimiser state, data order); a run
    stopped after epoch 1 and resumed twice ends with exactly the uninterrupted weights."""
    module = create("small-bn", info)
    config = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", learning_rate=0.05, nesterov=True,
                         weight_decay=5e-4, schedule="cosine", warmup_fraction=0.1, crop_padding=2, flip=True)
    key = jax.random.key(7)
    whole = train(module, task, config, key, progress=False)
    for stop_after in (1, 2):
        with pytest.raises(_Killed):
            train(module, task, config, key, progress=False, checkpoint_dir=tmp_path, on_epoch=_kill_after(stop_after))
    resumed_epochs = []
    resumed = train(module, task, config, key, progress=False, checkpoint_dir=tmp_path,
                    on_epoch=lambda epoch, _: resumed_epochs.append(epoch))
    assert resumed_epochs == [2]
    for a, b in zip(jax.tree_util.tree_leaves(whole.variables), jax.tree_util.tree_leaves(resumed.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert len(list(tmp_path.glob("state-*.npz"))) == 1  # only the last epoch's state is kept


def test_a_checkpoint_of_another_training_is_refused(info, task, tmp_path):
    from bdjax.checkpoint import CheckpointError, StaleTrainingState

    module = create("small-bn", info)
    with pytest.raises(_Killed):
        train(module, task, CONFIG, jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
              on_epoch=_kill_after(1))
    with pytest.raises(CheckpointError, match="another training") as refused:
        train(module, task, CONFIG, jax.random.key(1), progress=False, checkpoint_dir=tmp_path)
    assert isinstance(refused.value, StaleTrainingState) and refused.value.path == tmp_path  # zoo.py sets it aside


def test_a_corrupt_training_checkpoint_is_a_clear_error(info, task, tmp_path):
    from bdjax.checkpoint import CheckpointError

    module = create("small-bn", info)
    with pytest.raises(_Killed):
        train(module, task, CONFIG, jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
              on_epoch=_kill_after(1))
    state_file = next(tmp_path.glob("state-*.npz"))
    state_file.write_bytes(state_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(module, task, CONFIG, jax.random.key(0), progress=False, checkpoint_dir=tmp_path)


def test_a_diverging_training_stops_with_a_clear_error_and_saves_nothing(info, task, tmp_path):
    from bdjax.training import TrainingDiverged

    config = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", learning_rate=float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(create("small-bn", info), task, config, jax.random.key(0), progress=False, checkpoint_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_config_field_added_later_does_not_orphan_older_checkpoints():
    # Checkpoints written before TrainConfig had compute_dtype fingerprinted repr(config) without
    # it; at its old value (float32) the fingerprint's text is that repr, so they still resume.
    from bdjax.training import _config_text

    config = TrainConfig(epochs=40, batch_size=64, optimizer="sgd", weight_decay=1e-4)
    assert _config_text(config) == repr(config).replace(", compute_dtype='float32'", "")
    assert "compute_dtype='bfloat16'" in _config_text(TrainConfig(compute_dtype="bfloat16"))
