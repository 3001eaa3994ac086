"""Defense sweeps: runs × defenses × hyperparameters × seeds, vmapped, sharded and resumable.

A sweep is described by a Python config file with a ``get_config(variant)`` function that
returns a ``SweepConfig`` (see ``experiments/sweeps/``). Its grid splits into two kinds of axes:

- ``Grid.fixed``: values that change the program (epochs, a heuristic's name, the clean-set
  size). Every combination is its own *cell*.
- ``Grid.values``: values that only change numbers (seeds, thresholds such as μ or u,
  learning rates). All combinations inside a cell run as ONE vmapped program when the
  defense has a batched implementation over those axes (``defenses.register_batched``),
  with the setting axis sharded over every device of ``mesh``; otherwise they run one
  after another (the record says which: ``mode``).

Each finished cell is written atomically as one JSON record under ``OUT/cells/``; a
restarted sweep skips every cell whose record exists and names the same cell, so a killed
sweep loses at most the cell in flight. ``results_table`` turns the records into Markdown.

Multi-host (a TPU slice, several GPU nodes): start the same command on every host after
``jax.distributed.initialize()`` (``bdjax sweep --distributed`` calls it); ``jax.devices()``
then spans all hosts and the mesh covers them. Only process 0 writes records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint, defenses, sharding
from bdjax.evaluation import evaluate, evaluate_model, evaluate_stacked, model_classifier
from bdjax.runs import split_for_defense


@dataclasses.dataclass(frozen=True)
class Grid:
    """One defense's part of a sweep. ``fixed``/``values``: config field -> list of values.

    The field ``seed`` in ``values`` is special: it selects the defense's PRNG key
    (``fold_in(key, seed)``) rather than a config field.
    """

    defense: str
    fixed: dict[str, list] = dataclasses.field(default_factory=dict)
    values: dict[str, list] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    runs: tuple[str, ...]  # run directories (relative paths are resolved against the config file's folder)
    grids: tuple[Grid, ...]
    clean_per_class: int = 2
    clean_seeds: tuple[int, ...] = (0,)  # clean-set draws: one cell each (the set's size may differ)
    eval_limit: int | None = None  # stratified subset of the evaluation images
    seed: int = 0  # base PRNG key of every defense


@dataclasses.dataclass(frozen=True)
class Cell:
    run: str
    defense: str
    fixed: dict
    values: dict
    clean_seed: int

    @property
    def settings(self) -> list[dict]:
        names = sorted(self.values)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.values[n] for n in names))]

    def describe(self) -> dict:
        return {"run": self.run, "defense": self.defense, "fixed": self.fixed, "values": self.values,
                "clean_seed": self.clean_seed}

    @property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{Path(self.run).name}-{self.defense.replace('+', '_')}-{digest}"


def cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in a stable order (runs, then grids, then fixed combinations)."""
    out = []
    for run in config.runs:
        for grid in config.grids:
            defenses.get(grid.defense)  # unknown names fail before anything runs
            names = sorted(grid.fixed)
            for combo in itertools.product(*(grid.fixed[n] for n in names)):
                for clean_seed in config.clean_seeds:
                    out.append(Cell(run, grid.defense, dict(zip(names, combo)), dict(grid.values), clean_seed))
    return out


def load_config(path, variant: str = "local") -> SweepConfig:
    """Import ``path`` (a Python file) and call its ``get_config(variant)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"bdjax_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(variant) function")
    config = module.get_config(variant)
    if not isinstance(config, SweepConfig):
        raise TypeError(f"{path}: get_config must return a bdjax.sweep.SweepConfig, got {type(config).__name__}")
    runs = tuple(str(r) if Path(r).is_absolute() else str((path.parent / r).resolve()) for r in config.runs)
    return dataclasses.replace(config, runs=runs)


def _sequential(run, cell: Cell, clean, key, config) -> tuple[list, list]:
    """Each setting as its own call of the registered defense. Returns (variables, classifiers)."""
    spec = defenses.get(cell.defense)
    outputs, classifiers = [], []
    for setting in cell.settings:
        fields = {k: v for k, v in setting.items() if k != "seed"}
        setting_key = jax.random.fold_in(key, setting["seed"]) if "seed" in setting else key
        result = spec.fn(run.module, run.variables, clean, setting_key, dataclasses.replace(config, **fields))
        outputs.append(result.variables)
        classifiers.append(result.classifier)
    return outputs, classifiers


def run_cell(cell: Cell, sweep: SweepConfig, *, data_dir=None, mesh=None, vectorise: bool = True) -> dict:
    """Run one cell and return its record (nothing is written)."""
    run = checkpoint.load(cell.run)
    spec = defenses.get(cell.defense)
    config = defenses.make_config(spec.config_cls, cell.fixed)
    clean, sets = split_for_defense(run, sweep.clean_per_class, cell.clean_seed, data_dir, sweep.eval_limit)
    key = jax.random.fold_in(jax.random.key(sweep.seed), cell.clean_seed)
    settings = cell.settings
    batched = defenses.BATCHED.get(cell.defense)
    started = time.perf_counter()
    if vectorise and batched is not None and set(cell.values) <= batched.axes and not spec.detector:
        mode, n = "vmapped", len(settings)
        padded = sharding.padded_size(n, mesh)
        values = sharding.pad_leading({k: np.asarray([s[k] for s in settings]) for k in cell.values}, padded)
        stacked = batched.fn(run.module, run.variables, clean, key, config, values, mesh)
        jax.block_until_ready(stacked)
        seconds = time.perf_counter() - started
        after = evaluate_stacked(run.module, stacked, sets, mesh)[:n]
    else:
        mode = "sequential"
        outputs, classifiers = _sequential(run, cell, clean, key, config)
        jax.block_until_ready(outputs)
        seconds = time.perf_counter() - started
        after = [evaluate(c or model_classifier(run.module, v), sets, detector=spec.detector)
                 for v, c in zip(outputs, classifiers)]
    before = evaluate_model(run.module, run.variables, sets)
    return {
        "cell": cell.id, **cell.describe(), "settings": settings, "mode": mode,
        "devices": 1 if mesh is None else mesh.size, "backend": jax.default_backend(),
        "model": run.record["model"], "dataset": run.dataset, "attack": run.record.get("spec", {}).get("attack"),
        "defense_size": len(clean), "eval_size": len(sets.clean), "seconds": seconds,
        "before": before.to_dict(), "after": [r.to_dict() for r in after],
    }


def record_path(out_dir, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / f"{cell.id}.json"


def run_sweep(sweep: SweepConfig, out_dir, *, data_dir=None, mesh=None, vectorise: bool = True,
              log=print) -> list[dict]:
    """Run every cell that has no record yet; return all records in cell order."""
    records = []
    todo = cells(sweep)
    for i, cell in enumerate(todo):
        path = record_path(out_dir, cell)
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("cell") == cell.id:
                log(f"[{i + 1}/{len(todo)}] skip {cell.id} (done)")
                records.append(record)
                continue
        log(f"[{i + 1}/{len(todo)}] {cell.id}: {cell.defense} {cell.fixed} × {len(cell.settings)} settings")
        record = run_cell(cell, sweep, data_dir=data_dir, mesh=mesh, vectorise=vectorise)
        if jax.process_index() == 0:
            checkpoint.atomic_write(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        log(f"    {record['mode']} on {record['devices']} device(s): {record['seconds']:.1f} s")
        records.append(record)
    return records


def load_records(out_dir) -> list[dict]:
    folder = Path(out_dir) / "cells"
    if not folder.is_dir():
        raise FileNotFoundError(f"{out_dir} holds no sweep records (no cells/ folder)")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def results_table(records: list[dict]) -> str:
    """One Markdown row per setting: run, defense, setting, ACC/ASR/SIA before → after, seconds."""
    lines = ["| run | defense | fixed | setting | ACC before | ASR before | ACC | ASR | SIA | cell s | mode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        b = rec["before"]
        for setting, a in zip(rec["settings"], rec["after"]):
            lines.append(f"| {Path(rec['run']).name} | {rec['defense']} | {json.dumps(rec['fixed'])} | "
                         f"{json.dumps(setting)} | {_fmt(b['acc'])} | {_fmt(b.get('asr'))} | {_fmt(a['acc'])} | "
                         f"{_fmt(a.get('asr'))} | {_fmt(a.get('sia'))} | {rec['seconds']:.1f} | "
                         f"{rec['mode']}×{rec['devices']} |")
    return "\n".join(lines) + "\n"
