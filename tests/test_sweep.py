"""Defense sweeps: vmapped settings equal sequential runs, sharding changes nothing, restarts resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bdjax import defenses, sharding, sweep
from bdjax.data.dataset import Dataset
from bdjax.defenses import clp, finetune
from bdjax.defenses.base import BATCHED
from bdjax import evaluation
from bdjax.evaluation import evaluate_model, evaluate_stacked

from conftest import SYNTHETIC_INFO, random_uint8


@pytest.fixture(scope="module")
def clean_set() -> Dataset:
    return Dataset(random_uint8(16, seed=5), np.arange(16) % SYNTHETIC_INFO.num_classes, SYNTHETIC_INFO)


def _unstack(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _assert_trees_close(a, b, **tol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_cells_split_fixed_axes_into_cells_and_value_axes_into_settings():
    config = sweep.SweepConfig(name="t", runs=("a", "b"), clean_seeds=(0, 1), grids=(
        sweep.Grid("ft", fixed={"epochs": [1, 2]}, values={"learning_rate": [0.1, 0.2, 0.3], "seed": [0, 1]}),
        sweep.Grid("clp", values={"u": [1.0, 2.0]})))
    cells = sweep.cells(config)
    assert len(cells) == 2 * (2 + 1) * 2  # runs × (2 ft epoch values + clp) × clean draws
    ft = cells[0]
    assert ft.defense == "ft" and len(ft.settings) == 6
    assert {tuple(sorted(s.items())) for s in ft.settings} == {
        (("learning_rate", lr), ("seed", s)) for lr in (0.1, 0.2, 0.3) for s in (0, 1)}
    assert len({c.id for c in cells}) == len(cells)  # every cell has its own record


def test_unknown_defense_in_a_sweep_fails_before_running():
    with pytest.raises(ValueError, match="unknown defense"):
        sweep.cells(sweep.SweepConfig(name="t", runs=("a",), grids=(sweep.Grid("nope"),)))


def test_config_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sweep.load_config(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        sweep.load_config(bad)


def test_batched_ft_equals_one_finetune_per_setting(tiny_model, clean_set):
    """4 settings (2 seeds × 2 learning rates) in one train_many call = 4 calls of ``finetune``."""
    module, variables = tiny_model("small-bn")
    config = finetune.FinetuneConfig(epochs=2, batch_size=8, crop_padding=0)
    key = jax.random.key(7)
    settings = [{"seed": s, "learning_rate": lr} for s in (0, 1) for lr in (0.01, 0.05)]
    values = {k: np.asarray([s[k] for s in settings]) for k in ("seed", "learning_rate")}
    stacked = BATCHED["ft"].fn(module, variables, clean_set, key, config, values)
    for i, s in enumerate(settings):
        one = finetune.finetune(module, variables, clean_set, jax.random.fold_in(key, s["seed"]),
                                finetune.FinetuneConfig(epochs=2, batch_size=8, crop_padding=0,
                                                        learning_rate=s["learning_rate"])).variables
        _assert_trees_close(_unstack(stacked, i), one, rtol=1e-4, atol=1e-5)
    # Different settings really give different models.
    assert not np.allclose(_unstack(stacked, 0)["params"]["classifier"]["kernel"],
                           _unstack(stacked, 1)["params"]["classifier"]["kernel"])


def test_a_loop_over_learning_rates_compiles_the_fine_tuning_step_once(tiny_model, clean_set):
    """The rate is a per-model scale, not part of the compiled step's configuration."""
    from bdjax import training
    module, variables = tiny_model("small-bn")
    runs = [finetune.finetune(module, variables, clean_set, jax.random.key(0),
                              finetune.FinetuneConfig(epochs=1, batch_size=8, crop_padding=0, learning_rate=lr))
            for lr in (0.011, 0.013, 0.017)]
    misses = training._compiled_step.cache_info().misses
    finetune.finetune(module, variables, clean_set, jax.random.key(0),
                      finetune.FinetuneConfig(epochs=1, batch_size=8, crop_padding=0, learning_rate=0.019))
    assert training._compiled_step.cache_info().misses == misses
    kernels = [r.variables["params"]["classifier"]["kernel"] for r in runs]
    assert not np.allclose(kernels[0], kernels[2])  # the rates still differ


@pytest.mark.parametrize("name, field, grid", [("clp", "u", [0.5, 1.0, 2.0]), ("suspicion", "mu", [0.5, 1.0, 2.0])])
def test_batched_thresholds_equal_the_defense_at_each_threshold(tiny_model, clean_set, name, field, grid):
    module, variables = tiny_model("small-bn")
    spec = defenses.get(name)
    config = spec.config_cls()
    stacked = BATCHED[name].fn(module, variables, clean_set, jax.random.key(0), config, {field: np.asarray(grid)})
    for i, value in enumerate(grid):
        one = spec.fn(module, variables, clean_set, jax.random.key(0), spec.config_cls(**{field: value}))
        _assert_trees_close(_unstack(stacked, i), one.variables, rtol=0, atol=0)


def test_stacked_evaluation_equals_one_evaluation_per_model(tiny_model, clean_set):
    module, variables = tiny_model("small-bn")
    stacked = BATCHED["clp"].fn(module, variables, None, None, clp.ClpConfig(), {"u": np.asarray([0.1, 9.0])})
    sets = evaluation.TestSets(clean_set, clean_set, np.zeros(len(clean_set), np.int32))
    reports = evaluate_stacked(module, stacked, sets)
    for i, report in enumerate(reports):
        assert report == evaluate_model(module, _unstack(stacked, i), sets)


def test_padding_repeats_the_last_setting_and_unpads():
    tree = {"u": np.arange(5.0)}
    padded = sharding.pad_leading(tree, 8)
    np.testing.assert_array_equal(padded["u"], [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(sharding.unpad_leading(padded, 5)["u"], tree["u"])
    assert sharding.padded_size(5, None) == 5


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)  # as in conftest: faster compiles
    assert jax.device_count() == 4, jax.devices()
    from bdjax import models, sharding
    from bdjax.data.dataset import Dataset, DatasetInfo
    from bdjax.defenses.base import BATCHED
    from bdjax.defenses.finetune import FinetuneConfig
    from bdjax.evaluation import TestSets, evaluate_stacked

    info = DatasetInfo(name="synthetic", num_classes=4, image_shape=(32, 32, 3), mean=(0.5,) * 3,
                       std=(0.25,) * 3, flip_augment=False)
    rng = np.random.default_rng(0)
    clean = Dataset(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 4, info)
    module = models.create("small-bn", info)
    variables = models.init_variables(module, jax.random.key(0))
    values = sharding.pad_leading({"seed": np.arange(6), "learning_rate": np.linspace(0.01, 0.06, 6)}, 8)
    config = FinetuneConfig(epochs=1, batch_size=8, crop_padding=0)
    mesh = sharding.sweep_mesh()
    sharded = BATCHED["ft"].fn(module, variables, clean, jax.random.key(3), config, values, mesh)
    plain = BATCHED["ft"].fn(module, variables, clean, jax.random.key(3), config, values, None)
    leaf = jax.tree_util.tree_leaves(sharded)[0]
    assert len(leaf.sharding.device_set) == 4, leaf.sharding
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                                   rtol=1e-5, atol=1e-6), sharded, plain)
    sets = TestSets(clean, clean, np.zeros(16, np.int32))
    assert evaluate_stacked(module, sharded, sets, mesh) == evaluate_stacked(module, plain, sets)
    print("SHARDED-OK")
""")


def test_sharded_sweep_over_four_cpu_devices_equals_the_unsharded_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED-OK" in result.stdout


def test_train_many_rejects_a_model_count_that_does_not_split_over_the_mesh(tiny_model, clean_set):
    from bdjax.training import TrainConfig, train_many

    mesh = sharding.sweep_mesh()

    class Mesh3:  # as if there were 3 devices
        size = 3 * mesh.size

    module, _ = tiny_model("small-bn")
    with pytest.raises(ValueError, match="split evenly"):
        train_many(module, clean_set, TrainConfig(epochs=1, batch_size=8), jax.random.split(jax.random.key(0), 2),
                   mesh=Mesh3())


@pytest.mark.realdata
def test_sweep_writes_one_record_per_cell_and_resumes(gtsrb_badnets_dir, data_dir, tmp_path, monkeypatch):
    config = sweep.SweepConfig(name="t", runs=(str(gtsrb_badnets_dir),), clean_per_class=1, eval_limit=300,
                               grids=(sweep.Grid("clp", values={"u": [1.0, 3.0]}),
                                      sweep.Grid("suspicion", values={"mu": [1.0, 3.0]})))
    records = sweep.run_sweep(config, tmp_path, data_dir=data_dir, log=lambda *_: None)
    assert [r["mode"] for r in records] == ["vmapped", "vmapped"]  # threshold sweeps: vmapped by default
    for rec in records:
        assert rec["settings"] == [{rec["defense"] == "clp" and "u" or "mu": v} for v in (1.0, 3.0)]
        assert len(rec["after"]) == 2 and rec["defense_size"] == 43 and rec["before"]["asr"] > 0.5
    files = sorted((tmp_path / "cells").glob("*.json"))
    assert len(files) == 2

    # Restart after "a kill" that lost one cell (files sort by cell id: [0] is CLP's, the cheap
    # one to rerun): only that cell runs again.
    lost = json.loads(files[0].read_text())["cell"]
    files[0].unlink()
    ran = []
    real_run_cell = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda cell, *a, **k: ran.append(cell.id) or real_run_cell(cell, *a, **k))
    again = sweep.run_sweep(config, tmp_path, data_dir=data_dir, log=lambda *_: None)
    assert ran == [lost] and files[0].is_file()
    assert [r["after"] for r in again] == [r["after"] for r in records]
    assert "| clp |" in sweep.results_table(sweep.load_records(tmp_path))


# --------------------------------------------------------------------------- bad configs and records (issue 33)
def test_a_grid_without_values_runs_its_one_setting(tiny_model, clean_set, monkeypatch):
    from bdjax import checkpoint
    from bdjax.evaluation import TestSets

    module, variables = tiny_model("small-bn")
    run = checkpoint.Run(module, variables, {"model": "small-bn", "dataset": "synthetic"}, None, None)
    monkeypatch.setattr(sweep.checkpoint, "load", lambda path: run)
    monkeypatch.setattr(sweep, "split_for_defense", lambda *a: (clean_set, TestSets.build(clean_set, None, None)))
    config = sweep.SweepConfig(name="t", runs=("r",), grids=(sweep.Grid("clp"),))
    record = sweep.run_cell(sweep.cells(config)[0], config)
    assert record["settings"] == [{}] and record["mode"] == "sequential" and len(record["after"]) == 1


def test_on_cpu_a_sweep_loops_over_fine_tunings_and_vmaps_thresholds_unless_told(tiny_model, clean_set, monkeypatch):
    # sweep_benchmark.md: vmapped FT 2x slower than a loop on 2 CPU cores, vmapped CLP 3.7x faster.
    from bdjax import checkpoint
    from bdjax.evaluation import TestSets

    module, variables = tiny_model("small-bn")
    run = checkpoint.Run(module, variables, {"model": "small-bn", "dataset": "synthetic"}, None, None)
    monkeypatch.setattr(sweep.checkpoint, "load", lambda path: run)
    monkeypatch.setattr(sweep, "split_for_defense", lambda *a: (clean_set, TestSets.build(clean_set, None, None)))
    config = sweep.SweepConfig(name="t", runs=("r",), grids=(
        sweep.Grid("ft", fixed={"epochs": [1]}, values={"learning_rate": [0.01, 0.02]}),
        sweep.Grid("clp", values={"u": [1.0, 3.0]})))
    ft_cell, clp_cell = sweep.cells(config)
    assert jax.default_backend() == "cpu"
    assert sweep.run_cell(ft_cell, config)["mode"] == "sequential"
    assert sweep.run_cell(ft_cell, config, vectorise=True)["mode"] == "vmapped"
    assert sweep.run_cell(clp_cell, config)["mode"] == "vmapped"


def test_cells_name_runs_as_the_config_writes_them_so_another_checkout_reuses_the_records(tmp_path):
    for checkout in ("a", "b"):
        folder = tmp_path / checkout / "sweeps"
        folder.mkdir(parents=True)
        (folder / "s.py").write_text(textwrap.dedent("""
            from bdjax.sweep import Grid, SweepConfig
            def get_config(variant):
                return SweepConfig(name="s", runs=("../zoo/run",), grids=(Grid("clp", values={"u": [1.0]}),))
            """))
    a, b = (sweep.load_config(tmp_path / c / "sweeps" / "s.py", "local") for c in ("a", "b"))
    assert [c.id for c in sweep.cells(a)] == [c.id for c in sweep.cells(b)]
    assert sweep.cells(a)[0].run == "../zoo/run" and a.run_path("../zoo/run") == tmp_path / "a" / "sweeps" / "../zoo/run"


def test_grids_names_and_fields_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match=r"Grid\('ft'\).values\['seed'\] must be a non-empty list"):
        sweep.Grid("ft", values={"seed": []})
    with pytest.raises(ValueError, match=r"Grid\('ft'\).fixed\['epochs'\] must be a non-empty list"):
        sweep.Grid("ft", fixed={"epochs": 5})
    with pytest.raises(ValueError, match=r"FinetuneConfig has no field\(s\) \['epoch'\]"):
        sweep.cells(sweep.SweepConfig(name="t", runs=("a",), grids=(sweep.Grid("ft", fixed={"epoch": [1]}),)))
    for name in ("../../outside", "a/b", "", ".."):
        with pytest.raises(ValueError, match="plain folder name"):
            sweep.SweepConfig(name=name, runs=("a",), grids=(sweep.Grid("clp"),))


def test_a_truncated_cell_record_is_reported_by_name_and_run_again(tmp_path, monkeypatch):
    config = sweep.SweepConfig(name="t", runs=("a",), grids=(sweep.Grid("clp", values={"u": [1.0, 2.0]}),
                                                             sweep.Grid("suspicion")))
    ran = []

    def fake_run_cell(cell, *args, **kwargs):
        ran.append(cell.id)
        return {"cell": cell.id, **cell.describe(), "settings": cell.settings, "mode": "sequential",
                "devices": 1, "seconds": 0.0, "before": {"acc": 0.5, "asr": float("nan"), "sia": float("nan")},
                "after": [{"acc": 0.5, "asr": float("nan"), "sia": float("nan")}] * len(cell.settings)}

    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    sweep.run_sweep(config, tmp_path, log=lambda *_: None)
    files = sorted((tmp_path / "cells").glob("*.json"))
    assert "NaN" not in files[0].read_text()  # strict JSON: a missing rate is null
    files[0].write_text(files[0].read_text()[:40])
    with pytest.raises(ValueError, match=f"cell record {files[0]} is unreadable"):
        sweep.load_records(tmp_path)
    ran.clear()
    logged = []
    sweep.run_sweep(config, tmp_path, log=logged.append)
    assert ran == [json.loads(files[0].read_text())["cell"]]
    assert any(str(files[0]) in line and "running the cell again" in line for line in logged)
    assert "| clp |" in sweep.results_table(sweep.load_records(tmp_path))


def test_a_diverged_setting_is_recorded_without_numbers(tiny_model):
    _, variables = tiny_model("small-bn")
    stacked = defenses.base.tile(variables, 3)
    stacked = jax.tree_util.tree_map(lambda x: x.at[1].set(np.nan) if x.dtype.kind == "f" else x, stacked)
    np.testing.assert_array_equal(sweep._finite_per_model(stacked), [True, False, True])
    record = {"run": "r", "defense": "ft", "fixed": {}, "settings": [{"learning_rate": 9.0}], "seconds": 0.0,
              "mode": "sequential", "devices": 1, "before": {"acc": 0.5, "asr": 0.9, "sia": 0.1},
              "after": [sweep.DIVERGED]}
    assert "| – | – | – |" in sweep.results_table([record])
