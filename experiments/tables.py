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
import json
import math
import subprocess
from pathlib import Path

import numpy as np

from bdjax import checkpoint

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


def commit() -> str:
    """The repository's commit, '+dirty' when the working tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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
        """Keep a finished cell (stamped with the commit and time that measured it) and save."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.cells.append({**cell, "commit": self.commit, "measured": now})
        payload = {"settings": self.settings, "updated": now, "cells": self.cells}
        checkpoint.atomic_write(self.path, (json.dumps(payload, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
    """'91.23 ± 0.45 (n=3)' of the finite values (in % with the default scale); '–' if none."""
    values = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f} (n={len(values)})"


def group(cells: list[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Cells grouped by ``fields`` in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[f] for f in fields), []).append(cell)
    return groups
