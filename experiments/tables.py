"""What the paper-table scripts share: the zoo they read, resumable cell records, mean ± std.

A table script measures *cells* (a model, a clean-set size, a method, a seed) and keeps each
finished cell in one JSON record (``results/NAME.json``), written atomically after every
cell, so a killed script continues where it stopped and the Markdown beside it
(``results/NAME.md``) is always regenerated from the record, never pasted.
Seeds vary the defender's clean-set draw and the defense's own randomness; the evaluation
set is the rest of the test split (the whole of it minus the defense set, unless a script is
told ``--eval-limit``).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint, defenses
from bdjax.evaluation import evaluate_model
from bdjax.metrics import defense_effectiveness_rating
from bdjax.runs import split_for_defense

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ZOO_DIRS = {"v1": HERE / "zoo", "v2": HERE / "zoo-v2"}


def zoo_run(zoo: str, name: str) -> checkpoint.Run:
    """A zoo model by name, with a clear error when it is not trained yet."""
    path = ZOO_DIRS[zoo] / name
    if not (path / checkpoint.RECORD_FILE).is_file():
        raise SystemExit(f"zoo {zoo} has no trained model {name!r} ({path}); train it with "
                         f"`python experiments/zoo.py --only {name}`" + ("" if zoo == "v2" else f" --variant {zoo}"))
    return checkpoint.load(path)


def trained(names, zoo: str = "v2") -> list[str]:
    """The runs of ``names`` that zoo ``zoo`` holds (trained), in order."""
    return [name for name in names if (ZOO_DIRS[zoo] / name / checkpoint.RECORD_FILE).is_file()]


def commit(*paths: str) -> str:
    """The repository's commit, '+dirty' when the working tree has uncommitted changes to tracked
    files (with ``paths``: any change under them, new files included; relative to this folder)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *paths) if paths else git("status", "--porcelain",
                                                                          "--untracked-files=no")
    return sha + ("+dirty" if dirty else "")


class CellRecord:
    """A JSON record of finished cells, keyed by the cell's identifying fields.

    ``settings`` (the script's arguments that change numbers) are stored with the record; a
    record written with other settings is not mixed in: the script refuses to continue it.
    """

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.settings = settings
        self.cells: list[dict] = []
        self.commit = commit()  # at the start: later edits of the tree do not change it
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            if stored.get("settings") != settings:
                raise SystemExit(f"{self.path} was written with settings {stored.get('settings')}, not "
                                 f"{settings}; move it away (or pass the same settings) to continue")
            self.cells = stored["cells"]

    def find(self, **fields) -> dict | None:
        for cell in self.cells:
            if all(cell.get(k) == v for k, v in fields.items()):
                return cell
        return None

    def add(self, cell: dict):
        """Keep a finished cell (stamped with the commit and time that measured it) and save.

        Two scripts may fill one record at once: under a lock, the cells another writer saved
        since this one read the file are merged in, so neither loses the other's cells; a cell
        both measured alike (e.g. the undefended row each computes for itself: equal but for its
        time stamp, commit and seconds) is kept once."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.cells.append(json.loads(json.dumps({**cell, "commit": self.commit, "measured": now}, default=_jsonable)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                stored = json.loads(self.path.read_text())["cells"]
                seen = [_measured_alike(c) for c in stored]
                self.cells = stored + [c for c in self.cells if _measured_alike(c) not in seen]
            payload = {"settings": self.settings, "updated": now, "cells": self.cells}
            checkpoint.atomic_write(self.path, (json.dumps(payload, indent=1) + "\n").encode())


def _measured_alike(cell: dict) -> dict:
    """A cell without what differs between two measurements of the same thing."""
    return {k: v for k, v in cell.items() if k not in ("measured", "commit", "seconds")}


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def mean_std(values, scale: float = 100.0, digits: int = 2, count: bool = True) -> str:
    """'91.23 ± 0.45 (n=3)' of the finite values (in % with the default scale; without the
    count with ``count=False``; no ± for one value); '–' if none."""
    values = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    text = f"{np.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {np.std(values, ddof=1):.{digits}f}"
    return text + (f" (n={len(values)})" if count else "")


def group(cells: list[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Cells grouped by ``fields`` in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[f] for f in fields), []).append(cell)
    return groups


def measure(run, name: str, attack: str, k: int, seed: int, methods: dict[str, tuple],
            record: CellRecord, data_dir=None, eval_limit=None, outputs=None, evaluate=None, extra=None):
    """Every missing cell of (``name``, ``k``, ``seed``): the undefended model and each method.

    ``methods``: row label -> (registered defense, config overrides); in place of a registered
    name, a function ``fn(run, clean, key) -> DefenseResult`` measures what is not a defense (e.g.
    pruning with the attack's own trigger), with empty overrides. ``outputs(label, registered,
    result)`` may turn one defense call into several rows: a list of (label or None for the
    method's own, variables, seconds or None for the call's, info for the record).
    ``evaluate(run, registered, result, variables, sets) -> dict | None`` measures a row in place
    of the model's own predictions (e.g. a detector's test-time rule): ``acc``, ``asr`` (None on a
    clean model) and any further rates for the record; None: the model's predictions after all.
    ``extra``: further fields of every cell (e.g. the attack's target mode).
    """
    todo = [m for m in methods if record.find(run=name, k=k, seed=seed, method=m) is None]
    before = record.find(run=name, k=k, seed=seed, method="none")
    if not todo and before is not None:
        return
    clean, sets = split_for_defense(run, k, seed, data_dir, eval_limit)
    base = dict(run=name, attack=attack, dataset=run.dataset, model=run.record["model"], k=k, seed=seed,
                defense_size=len(clean), eval_size=len(sets.clean), triggered_size=len(sets.triggered),
                **(extra or {}))
    if before is None:
        before = dict(base, method="none", **_model_rates(run.module, run.variables, sets), der=None, seconds=None)
        record.add(before)
        print(line(before), flush=True)
    for method in todo:
        registered, overrides = methods[method]
        result, seconds = timed_defense(run, registered, overrides, clean, seed)
        own = [(None, result.variables, None, scalars(result.info))]
        rows = outputs(method, registered, result) if outputs else own
        for label, variables, secs, info in rows:
            label = label or method
            if record.find(run=name, k=k, seed=seed, method=label):
                continue
            rates = None if evaluate is None else evaluate(run, registered, result, variables, sets)
            if rates is None:
                rates = _model_rates(run.module, variables, sets)
            der = (None if rates["asr"] is None or before["asr"] is None else
                   defense_effectiveness_rating(before["acc"], before["asr"], rates["acc"], rates["asr"]))
            cell = dict(base, method=label, **rates, der=der, seconds=seconds if secs is None else secs, info=info)
            record.add(cell)
            print(line(cell), flush=True)


def _model_rates(module, variables, sets) -> dict:
    """ACC and ASR of the model's own predictions (ASR None on a clean model: no triggered inputs)."""
    report = evaluate_model(module, variables, sets)
    return {"acc": report.acc, "asr": report.asr if math.isfinite(report.asr) else None}


def timed_defense(run, method, overrides: dict, clean, seed: int):
    """(DefenseResult, seconds) of registered defense ``method`` with config ``overrides``
    on ``run`` (or of ``method(run, clean, key)`` when it is a function, see :func:`measure`);
    the seconds include compilation and wait for the result's arrays."""
    if callable(method):
        if overrides:
            raise ValueError(f"config overrides {overrides} need a registered defense, not {method!r}")
        started = time.perf_counter()
        result = method(run, clean, jax.random.key(seed))
        jax.block_until_ready(result.variables)
        return result, time.perf_counter() - started
    spec = defenses.get(method)
    config = defenses.make_config(spec.config_cls, overrides)
    started = time.perf_counter()
    result = spec.fn(run.module, run.variables, clean, jax.random.key(seed), config)
    jax.block_until_ready(result.variables)
    return result, time.perf_counter() - started


SHORT_LIST = 64


def scalars(info: dict) -> dict:
    """The plain numbers and strings of a defense's info (what it pruned, flagged, chose), and its
    short lists of integers (e.g. the labels Neural Cleanse flags: ``SHORT_LIST`` at most)."""
    plain = (bool, int, float, str, np.integer, np.floating, np.bool_)
    out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in info.items()
           if isinstance(v, plain) and not (isinstance(v, float) and not math.isfinite(v))}
    out.update({k: [int(i) for i in v] for k, v in info.items() if isinstance(v, (list, tuple))
                and len(v) <= SHORT_LIST and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                 for i in v)})
    return out


def line(cell: dict) -> str:
    """One measured cell, for the progress log."""
    der = "–" if cell["der"] is None else f"{100 * cell['der']:.2f}"
    asr = "–" if cell["asr"] is None else f"{100 * cell['asr']:.2f}"
    return (f"  {cell['run']} k={cell['k']} seed={cell['seed']} {cell['method']}: ACC {100 * cell['acc']:.2f} "
            f"ASR {asr} DER {der} ({cell['seconds'] or 0:.0f} s)")
