"""Run directories round-trip exactly, and broken ones fail loudly without losing files."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import attacks, checkpoint, models
from bdjax.data import GTSRB


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    module = models.create("small-bn", GTSRB)
    variables = models.init_variables(module, jax.random.key(0))
    attack = attacks.make("blended", jax.random.key(1))
    target = attacks.TargetMap("all_to_one", 14, 43)
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint.save(run_dir, variables, {"dataset": "gtsrb", "model": "small-bn", "metrics": {"acc": 0.5}},
                    attack, target)
    return run_dir, module, variables, attack, target


def test_round_trip_restores_variables_attack_and_target(saved_run):
    run_dir, module, variables, attack, target = saved_run
    run = checkpoint.load(run_dir)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(run.variables)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(run.variables)
    images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    np.testing.assert_array_equal(attack.apply(images), run.attack.apply(images))
    assert run.target == target
    assert run.record["metrics"] == {"acc": 0.5}
    np.testing.assert_allclose(module.apply(variables, images), run.module.apply(run.variables, images))


def test_no_temporary_files_are_left_behind(saved_run):
    run_dir = saved_run[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["record.json", "variables.npz"]


def _copy(run_dir, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for f in run_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_corrupt_variables_file_is_reported(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    data = bytearray((run_dir / "variables.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run_dir / "variables.npz").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(run_dir)


def test_truncated_record_is_reported(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    text = (run_dir / "record.json").read_text()
    (run_dir / "record.json").write_text(text[: len(text) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.load(run_dir)


def test_missing_directory_and_files_are_reported(saved_run, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")
    run_dir = _copy(saved_run[0], tmp_path)
    (run_dir / "variables.npz").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load(run_dir)


def test_variables_of_another_architecture_are_rejected(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    record["model"] = "medium-bn"
    record["record_sha256"] = checkpoint.record_hash(record)  # consistent, as another tool might write it
    (run_dir / "record.json").write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="does not match model 'medium-bn'"):
        checkpoint.load(run_dir)


def test_failed_save_keeps_the_previous_checkpoint(saved_run, tmp_path, monkeypatch):
    run_dir = _copy(saved_run[0], tmp_path)
    before = (run_dir / "variables.npz").read_bytes()
    variables = saved_run[2]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    broken = {**variables, "params": jax.tree_util.tree_map(jnp.zeros_like, variables["params"])}
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(run_dir, broken, {"dataset": "gtsrb", "model": "small-bn"})
    assert (run_dir / "variables.npz").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["record.json", "variables.npz"]
    monkeypatch.undo()
    checkpoint.load(run_dir)


def test_a_hand_edited_record_is_refused(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    record["target"]["target"] = 3  # believed before record.json had a checksum
    (run_dir / "record.json").write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="record.json was changed after it was written"):
        checkpoint.load(run_dir)


def test_records_written_before_the_record_checksum_still_load(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    del record["record_sha256"]
    (run_dir / "record.json").write_text(json.dumps(record))
    assert checkpoint.load(run_dir).target == saved_run[4]
    committed = Path(__file__).parent / "models" / "medium-bn-gtsrb-badnets-4k"
    assert "record_sha256" not in json.loads((committed / "record.json").read_text())
    assert checkpoint.load(committed).target.target == 14


def test_update_record_keeps_the_checksum_valid(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    checkpoint.update_record(run_dir, note="checked")
    assert checkpoint.load(run_dir).record["note"] == "checked"


def test_non_finite_weights_are_neither_saved_nor_loaded(saved_run, tmp_path):
    _, _, variables, _, _ = saved_run
    diverged = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), variables)
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.save(tmp_path / "nan", diverged, {"dataset": "gtsrb", "model": "small-bn"})
    assert not (tmp_path / "nan").exists()
    # A NaN file with matching hashes (as an older bdjax wrote it) is refused when loaded.
    run_dir = _copy(saved_run[0], tmp_path)
    with np.load(run_dir / "variables.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["params/classifier/bias"] = np.full_like(arrays["params/classifier/bias"], np.inf)
    np.savez(run_dir / "variables.npz", **arrays)
    record = json.loads((run_dir / "record.json").read_text())
    record["variables_sha256"] = hashlib.sha256((run_dir / "variables.npz").read_bytes()).hexdigest()
    record["record_sha256"] = checkpoint.record_hash(record)
    (run_dir / "record.json").write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="params/classifier/bias holds 43 non-finite"):
        checkpoint.load(run_dir)


def test_save_replaces_a_run_whole_and_leaves_nothing_beside_it(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    (run_dir / "training").mkdir()  # an unfinished training's state stays with the run, as do other files
    (run_dir / "training" / "state.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, saved_run[2])
    checkpoint.save(run_dir, zeros, {"dataset": "gtsrb", "model": "small-bn", "metrics": {"acc": 0.1}})
    run = checkpoint.load(run_dir)
    assert run.record["metrics"] == {"acc": 0.1} and run.attack is None
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(run.variables["params"]))
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "record.json", "training", "variables.npz"]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "training" / "state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from bdjax import checkpoint
    run_dir = sys.argv[1]
    variables = checkpoint.load(run_dir).variables
    checkpoint._exchange = lambda a, b: False  # the two-rename fallback, killed between the renames
    rename = os.rename
    def rename_then_die(source, target):
        if str(target) == run_dir:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target)
    checkpoint.os.rename = rename_then_die
    checkpoint.save(run_dir, variables, {"dataset": "gtsrb", "model": "small-bn", "metrics": {"acc": 0.9}})
""")


def test_a_kill_during_the_swap_leaves_a_complete_run(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run_dir)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == -9, result.stderr[-2000:]
    assert not run_dir.exists()  # killed with the old run aside and the new one complete beside it
    run = checkpoint.load(run_dir)  # finishes the swap
    assert run.record["metrics"] == {"acc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
