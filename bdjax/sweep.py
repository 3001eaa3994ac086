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

Which of the two runs is chosen by backend (``vectorise_cell``): on an accelerator every
batched defense is vmapped; on CPU the ones that change weights by gradient steps through
the network (``BatchedSpec.slower_on_cpu``: FT) loop, since XLA:CPU runs a vmapped
convolution backward pass slower than a loop of single ones
(``experiments/results/sweep_benchmark.md``), while the ones that only evaluate (CLP's u,
suspicion's μ) are vmapped there too. ``vectorise=`` (``bdjax sweep --vmap/--sequential``)
or ``BDJAX_SWEEP=vmap|loop|auto`` overrides it.

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
import os
import re
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint, defenses, progress, sharding
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

    def __post_init__(self):
        for axes in ("fixed", "values"):
            grid = getattr(self, axes)
            if not isinstance(grid, dict):
                raise TypeError(f"Grid({self.defense!r}).{axes} must be a dict of field -> list of values, "
                                f"got {type(grid).__name__}")
            for name, options in grid.items():
                if not isinstance(options, (list, tuple)) or len(options) == 0:
                    raise ValueError(f"Grid({self.defense!r}).{axes}[{name!r}] must be a non-empty list of "
                                     f"values, got {options!r}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    runs: tuple[str, ...]  # run directories, relative ones to ``root``
    grids: tuple[Grid, ...]
    clean_per_class: int = 2
    clean_seeds: tuple[int, ...] = (0,)  # clean-set draws: one cell each (the set's size may differ)
    eval_limit: int | None = None  # stratified subset of the evaluation images
    seed: int = 0  # base PRNG key of every defense
    # The folder relative runs are read from (``load_config``: the config file's). Cells and records
    # name runs as written, so a record made in one checkout is found again in another.
    root: str = ""

    def run_path(self, run: str) -> Path:
        return Path(run) if Path(run).is_absolute() else Path(self.root) / run

    def __post_init__(self):
        # The name is a folder under the records folder (runs/sweeps/NAME): a plain name only.
        if not isinstance(self.name, str) or not _PLAIN_NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise ValueError(f"sweep name must be a plain folder name (letters, digits, '.', '_', '-'), "
                             f"got {self.name!r}")
        if not self.grids or not all(isinstance(g, Grid) for g in self.grids):
            raise ValueError(f"sweep {self.name!r}: grids must be a non-empty tuple of Grid")
        if isinstance(self.runs, str) or not self.runs:
            raise ValueError(f"sweep {self.name!r}: runs must be a non-empty tuple of run directories")
        if not isinstance(self.clean_per_class, int) or self.clean_per_class < 1:
            raise ValueError(f"sweep {self.name!r}: clean_per_class must be a positive int, got {self.clean_per_class!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise ValueError(f"sweep {self.name!r}: eval_limit must be a positive int or None (all), "
                             f"got {self.eval_limit!r}")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


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
    for grid in config.grids:  # unknown defenses and fields fail before anything runs
        spec = defenses.get(grid.defense)
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        unknown = sorted((set(grid.fixed) | set(grid.values)) - fields - {"seed"})
        if unknown or "seed" in grid.fixed:
            raise ValueError(f"Grid({grid.defense!r}): {spec.config_cls.__name__} has no field(s) "
                             f"{unknown or ['seed']} (seed is a values axis only); fields: {', '.join(sorted(fields))}")
    for run in config.runs:
        for grid in config.grids:
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
    if spec is None or path.suffix != ".py":
        raise ValueError(f"sweep config {path} must be a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"sweep config {path} fails to run: {type(err).__name__}: {err}") from err
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(variant) function")
    try:
        config = module.get_config(variant)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: get_config({variant!r}) failed: {type(err).__name__}: {err}") from err
    if not isinstance(config, SweepConfig):
        raise TypeError(f"{path}: get_config must return a bdjax.sweep.SweepConfig, got {type(config).__name__}")
    return dataclasses.replace(config, root=str(path.parent.resolve()))


def _sequential(run, cell: Cell, clean, key, config) -> tuple[list, list]:
    """Each setting as its own call of the registered defense. Returns (variables, classifiers)."""
    spec = defenses.get(cell.defense)
    outputs, classifiers = [], []
    steps = progress.Steps(f"{cell.id}: setting", len(cell.settings))
    for setting in cell.settings:
        fields = {k: v for k, v in setting.items() if k != "seed"}
        setting_key = jax.random.fold_in(key, setting["seed"]) if "seed" in setting else key
        result = spec.fn(run.module, run.variables, clean, setting_key, dataclasses.replace(config, **fields))
        outputs.append(result.variables)
        classifiers.append(result.classifier)
        if progress.shown():
            jax.block_until_ready(result.variables)
        steps.done()
    return outputs, classifiers


SWEEP_MODES = ("vmap", "loop", "auto")


def vectorise_cell(defense: str, vectorise: bool | None = None, backend: str | None = None) -> bool:
    """Whether a cell of ``defense`` runs its settings as one vmapped program: ``vectorise``
    if given, else ``$BDJAX_SWEEP`` ("vmap", "loop" or "auto", the default). "auto": vmapped
    where the defense has a batched implementation, except on CPU (``backend``, default
    ``jax.default_backend()``) for those that change weights (``BatchedSpec.slower_on_cpu``)."""
    batched = defenses.BATCHED.get(defense)
    if vectorise is not None:
        return bool(vectorise) and batched is not None
    mode = os.environ.get("BDJAX_SWEEP") or "auto"
    if mode not in SWEEP_MODES:
        raise ValueError(f"BDJAX_SWEEP must be one of {SWEEP_MODES}, got {mode!r}")
    if batched is None or mode == "loop":
        return False
    return mode == "vmap" or not (batched.slower_on_cpu and (backend or jax.default_backend()) == "cpu")


def run_cell(cell: Cell, sweep: SweepConfig, *, data_dir=None, mesh=None, vectorise: bool | None = None) -> dict:
    """Run one cell and return its record (nothing is written).

    ``vectorise``: True runs the settings as one vmapped program where the defense has one,
    False as a loop; None (default): ``vectorise_cell``'s choice by backend."""
    run = checkpoint.load(sweep.run_path(cell.run))
    spec = defenses.get(cell.defense)
    config = defenses.make_config(spec.config_cls, cell.fixed)
    clean, sets = split_for_defense(run, sweep.clean_per_class, cell.clean_seed, data_dir, sweep.eval_limit)
    key = jax.random.fold_in(jax.random.key(sweep.seed), cell.clean_seed)
    settings = cell.settings
    batched = defenses.BATCHED.get(cell.defense)
    vectorise = vectorise_cell(cell.defense, vectorise)
    started = time.perf_counter()
    # Without value axes a cell is one setting: nothing to vmap.
    if vectorise and batched is not None and cell.values and set(cell.values) <= batched.axes and not spec.detector:
        mode, n = "vmapped", len(settings)
        padded = sharding.padded_size(n, mesh)
        values = sharding.pad_leading({k: np.asarray([s[k] for s in settings]) for k in cell.values}, padded)
        stacked = batched.fn(run.module, run.variables, clean, key, config, values, mesh)
        jax.block_until_ready(stacked)
        seconds = time.perf_counter() - started
        finite = _finite_per_model(stacked)[:n]
        after = [r.to_dict() if ok else dict(DIVERGED)
                 for r, ok in zip(evaluate_stacked(run.module, stacked, sets, mesh)[:n], finite)]
    else:
        mode = "sequential"
        outputs, classifiers = _sequential(run, cell, clean, key, config)
        jax.block_until_ready(outputs)
        seconds = time.perf_counter() - started
        after = [evaluate(c or model_classifier(run.module, v), sets, detector=spec.detector).to_dict()
                 if _finite_per_model(v, stacked=False).all() else dict(DIVERGED) for v, c in zip(outputs, classifiers)]
    before = evaluate_model(run.module, run.variables, sets)
    return {
        "cell": cell.id, **cell.describe(), "settings": settings, "mode": mode,
        "devices": 1 if mesh is None else mesh.size, "backend": jax.default_backend(),
        "model": run.record["model"], "dataset": run.dataset, "attack": run.record.get("spec", {}).get("attack"),
        "defense_size": len(clean), "eval_size": len(sets.clean), "seconds": seconds,
        "before": before.to_dict(), "after": after,
    }


# The "after" of a setting whose repaired weights hold NaN or inf: no numbers, not those of a
# model that predicts one class for everything.
DIVERGED = {"acc": None, "asr": None, "sia": None, "diverged": True}


def _finite_per_model(variables, stacked: bool = True) -> np.ndarray:
    """bool[M]: which of M stacked models (or bool[1] for one model) has only finite weights."""
    flags = None
    for leaf in jax.tree_util.tree_leaves(variables):
        leaf = np.asarray(leaf)
        if not np.issubdtype(leaf.dtype, np.inexact):
            continue
        ok = np.isfinite(leaf.reshape(leaf.shape[0] if stacked else 1, -1)).all(axis=1)
        flags = ok if flags is None else flags & ok
    return np.ones(1, bool) if flags is None else flags


def record_path(out_dir, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / f"{cell.id}.json"


def run_sweep(sweep: SweepConfig, out_dir, *, data_dir=None, mesh=None, vectorise: bool | None = None,
              log=print) -> list[dict]:
    """Run every cell that has no record yet; return all records in cell order."""
    records = []
    todo = cells(sweep)
    ran, ran_seconds = 0, 0.0
    for i, cell in enumerate(todo):
        path = record_path(out_dir, cell)
        if path.is_file():
            try:
                record = read_record(path)
            except ValueError as err:
                log(f"[{i + 1}/{len(todo)}] {err}; running the cell again")
            else:
                if record.get("cell") == cell.id:
                    log(f"[{i + 1}/{len(todo)}] skip {cell.id} (done)")
                    records.append(record)
                    continue
        log(f"[{i + 1}/{len(todo)}] {cell.id}: {cell.defense} {cell.fixed} × {len(cell.settings)} settings")
        record = run_cell(cell, sweep, data_dir=data_dir, mesh=mesh, vectorise=vectorise)
        if jax.process_index() == 0:
            checkpoint.atomic_write(path, (json.dumps(_strict(record), indent=1, sort_keys=True, allow_nan=False)
                                           + "\n").encode())
        ran, ran_seconds = ran + 1, ran_seconds + record["seconds"]
        left = len(todo) - i - 1
        log(f"    {record['mode']} on {record['devices']} device(s): {record['seconds']:.1f} s"
            + (f"; ETA {ran_seconds / ran * left / 60:.1f} min for the {left} cell(s) left" if left else ""))
        records.append(record)
    return records


def read_record(path) -> dict:
    """One cell record; ValueError naming the file when it is truncated or not a record."""
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cell record {path} is unreadable (truncated? {err})") from None
    if not isinstance(record, dict) or not {"cell", "settings", "after", "before"} <= set(record):
        raise ValueError(f"cell record {path} is not a bdjax sweep cell record")
    return record


def _strict(value):
    """NaN / inf (a clean model's ASR) as null: the records are strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def load_records(out_dir) -> list[dict]:
    """Every cell record under ``out_dir``; ValueError naming an unreadable one (rerun the sweep)."""
    folder = Path(out_dir) / "cells"
    if not folder.is_dir():
        raise FileNotFoundError(f"{out_dir} holds no sweep records (no cells/ folder)")
    return [read_record(p) for p in sorted(folder.glob("*.json"))]


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
