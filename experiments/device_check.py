"""One short run on an accelerator: what bdjax's programs cost there, compile time apart.

    BDJAX_DATA_DIR=../shared/data python experiments/device_check.py   # one GPU: under 8 minutes cold
    BDJAX_DATA_DIR=../shared/data python experiments/device_check.py --cpu --out-dir /tmp/check   # test size

No device figures exist yet: no accelerator has been lent to this project, so every number
this script has produced so far comes from ``--cpu`` (tiny sizes, a check that each section
runs, not a measurement).

Everything that needs no device work (the zoo model, the clean set, the suspects, the
synthetic training set) is prepared first; then, in this order, on the device:

- ``training``: training images/s of ResNet-20 and PreAct-ResNet-18 on 32x32 GTSRB-shaped
  images (a first call compiles, the second is timed), float32 and bfloat16 compute
  (``TrainConfig.compute_dtype``: bf16 forward/backward, float32 parameters);
- ``defenses``: every registered defense (``defense_benchmark.QUICK`` budgets) on the zoo v2
  ResNet-20 GTSRB BadNets, called twice: compile s = first call - second call;
- ``bna_pair_search`` (``bna.detect``), ``nc_all_labels`` (Neural Cleanse's search over every
  label, then its unlearning) and ``cetf_population`` (CETF's evolutionary search on
  suspects, seconds per screened input), each called twice as the defenses;
- ``ft_sweep``: 16 fine-tunings (4 learning rates x 4 seeds) as one vmapped program and as a
  loop (``bdjax.sweep.run_cell``).

No call starts once ``--budget-s`` seconds (400: with JAX's start and the data, under 8
minutes) have passed, and no defense once 35% of it is left; skipped calls are listed, and a
second call is skipped (None) when the first took longer than what is left. The sizes are
guesses until a first device run: where something was skipped, shrink ``Sizes.device``.
Writes ``device_check.md`` and ``device_check.json`` (date, device, JAX version, backend)
to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import defense_benchmark  # noqa: E402  (experiments/ is not a package)

from bdjax import checkpoint, defenses, models, sweep  # noqa: E402
from bdjax.data import clean_defense_split  # noqa: E402
from bdjax.data.dataset import Dataset  # noqa: E402
from bdjax.defenses import bna, cetf  # noqa: E402
from bdjax.runs import split_for_defense  # noqa: E402
from bdjax.training import TrainConfig, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs: ``device()`` on an accelerator, ``cpu()`` for tests/test_device_check.py."""

    train_models: tuple[str, ...] = ("resnet20", "preact-resnet18")
    train_images: int = 8192
    train_batch: int = 256
    train_epochs: int = 2
    per_class: int = 10  # the defender's clean set, as defense_benchmark
    eval_limit: int = 200
    methods: tuple[str, ...] | None = None  # None: every registered defense
    overrides: dict = dataclasses.field(default_factory=lambda: dict(defense_benchmark.QUICK))
    suspects: int = 20
    sweep_epochs: int = 5
    sweep_learning_rates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    sweep_seeds: tuple[int, ...] = (0, 1, 2, 3)
    sweep_per_class: int = 2
    reverse_steps: int = 60
    bna_sources: tuple[int, ...] | None = (1, 2, 3)  # None: every source (43 x 42 GTSRB pairs)
    nc_epochs: int = 10
    nc_one_chunk: bool = False  # every label in one compiled search (no padding to the default 64)
    cetf_population: int = 40
    cetf_generations: int = 100
    cetf_batch: int = 20
    budget_s: float = 400.0

    @classmethod
    def device(cls) -> "Sizes":
        return cls()

    @classmethod
    def cpu(cls) -> "Sizes":
        return cls(train_models=("resnet20",), train_images=32, train_batch=16, train_epochs=1, per_class=1,
                   eval_limit=20, methods=("anp", "clp", "ibau"),
                   overrides={"anp": {"iterations": 2}, "ibau": {"rounds": 1}}, suspects=4, sweep_epochs=1,
                   sweep_learning_rates=(0.01,), sweep_seeds=(0, 1), sweep_per_class=1, reverse_steps=2,
                   bna_sources=(1,), nc_epochs=1, nc_one_chunk=True, cetf_population=4, cetf_generations=2,
                   cetf_batch=2, budget_s=600.0)


class Clock:
    """Seconds since the measurements began, against the budget."""

    def __init__(self, budget_s: float):
        self.started, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def timed(fn):
    """(seconds, result) of ``fn()``, waiting for its arrays."""
    started = time.perf_counter()
    result = fn()
    jax.block_until_ready([x for x in jax.tree_util.tree_leaves(getattr(result, "variables", result))
                           if isinstance(x, jax.Array)])
    return time.perf_counter() - started, result


def twice(fn, clock: Clock) -> dict:
    """``fn`` called twice: ``first_s`` (compilation included), ``second_s`` and their difference
    ``compile_s``; the second call is skipped (None) once the budget is spent."""
    first, _ = timed(fn)
    if clock.left() <= first:
        return {"first_s": first, "second_s": None, "compile_s": None}
    second, _ = timed(fn)
    return {"first_s": first, "second_s": second, "compile_s": max(first - second, 0.0)}


# --------------------------------------------------------------------------- sections
def training(sizes: Sizes, info, clock: Clock) -> dict:
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (sizes.train_images, *info.image_shape), dtype=np.uint8),
                   rng.integers(0, info.num_classes, sizes.train_images).astype(np.int32), info)
    out = {}
    for name in sizes.train_models:
        module = models.create(name, info)
        out[name] = {}
        for dtype in ("float32", "bfloat16"):
            if clock.left() <= 0:
                out[name][dtype] = {"skipped": "budget spent"}
                continue
            config = TrainConfig(epochs=sizes.train_epochs, batch_size=sizes.train_batch, compute_dtype=dtype)
            images = config.steps_per_epoch(len(data)) * config.batch_size * config.epochs
            first, _ = timed(lambda: train(module, data, config, jax.random.key(0), progress=False))
            second = train(module, data, config, jax.random.key(1), progress=False).seconds
            out[name][dtype] = {"images_per_s": images / second, "first_s": first, "second_s": second,
                                "images": images, "batch": config.batch_size}
    return out


def defense_calls(sizes: Sizes, run, clean, suspect_images, clock: Clock) -> dict:
    """Each defense called twice; none starts once less than ``DEFENSES_LEAVE`` of the budget is left."""
    out = {}
    for method in sizes.methods or tuple(defenses.DEFENSES):
        if clock.left() <= DEFENSES_LEAVE * clock.budget_s:
            out[method] = {"skipped": "budget spent"}
            continue
        spec = defenses.get(method)
        overrides = dict(sizes.overrides.get(method, {}))
        if method in defense_benchmark.CETF_REPAIRS:
            overrides["suspect_images"] = suspect_images
        config = defenses.make_config(spec.config_cls, overrides)
        per_class = defense_benchmark.PER_CLASS.get(method)  # TAC and ABS: one image per class
        subset = clean_defense_split(clean, per_class, 0)[0] if per_class and per_class < sizes.per_class else clean
        out[method] = twice(lambda: spec.fn(run.module, run.variables, subset, jax.random.key(0), config), clock)
    return out


# The share of the budget the defenses leave to the sections after them.
DEFENSES_LEAVE = 0.35


def ft_sweep(sizes: Sizes, run_dir: Path, data_dir, clock: Clock) -> dict:
    grid = sweep.Grid("ft", fixed={"epochs": [sizes.sweep_epochs]},
                      values={"learning_rate": list(sizes.sweep_learning_rates), "seed": list(sizes.sweep_seeds)})
    config = sweep.SweepConfig(name="device-check", runs=(str(run_dir),), grids=(grid,),
                               clean_per_class=sizes.sweep_per_class, eval_limit=sizes.eval_limit)
    cell = sweep.cells(config)[0]
    if clock.left() <= 0:
        return {"settings": len(cell.settings), "skipped": "budget spent"}
    vmapped = sweep.run_cell(cell, config, data_dir=data_dir, vectorise=True)
    if clock.left() <= 0:
        return {"settings": len(cell.settings), "vmapped_s": vmapped["seconds"], "loop": "skipped: budget spent"}
    loop = sweep.run_cell(cell, config, data_dir=data_dir, vectorise=False)
    return {"settings": len(cell.settings), "vmapped_s": vmapped["seconds"], "loop_s": loop["seconds"],
            "loop_over_vmapped": loop["seconds"] / vmapped["seconds"],
            "max_acc_difference": max(abs(a["acc"] - b["acc"]) for a, b in zip(vmapped["after"], loop["after"]))}


def bna_pair_search(sizes: Sizes, run, clean, clock: Clock) -> dict:
    config = bna.BNAConfig(reverse={"steps": sizes.reverse_steps}, source_classes=sizes.bna_sources)
    pairs = len(bna.ordered_pairs(clean.info.num_classes, config.source_classes))
    calls = twice(lambda: bna.detect(run.module, run.variables, clean, jax.random.key(0), config), clock)
    return {"pairs": pairs, "steps": sizes.reverse_steps, **calls}


def nc_all_labels(sizes: Sizes, run, clean, clock: Clock) -> dict:
    spec = defenses.get("nc")
    search = {"epochs": sizes.nc_epochs}
    if sizes.nc_one_chunk:
        search["chunk_size"] = clean.info.num_classes
    config = defenses.make_config(spec.config_cls, {"reverse": search, "epochs": 1})
    calls = twice(lambda: spec.fn(run.module, run.variables, clean, jax.random.key(0), config), clock)
    return {"labels": clean.info.num_classes, "search_epochs": sizes.nc_epochs, **calls}


def cetf_population(sizes: Sizes, run, clean, suspect_images, clock: Clock) -> dict:
    config = cetf.CETFConfig(population_size=sizes.cetf_population, max_generations=sizes.cetf_generations,
                             patience=sizes.cetf_generations, batch_size=sizes.cetf_batch,
                             num_auxiliary=min(10, len(clean) - 1))
    auxiliary, filter_images = cetf.auxiliary_split(clean, jax.random.key(1), config)
    calls = twice(lambda: cetf.screen(run.module, run.variables, suspect_images, auxiliary, filter_images,
                                      jax.random.key(0), config), clock)
    per_input = None if calls["second_s"] is None else calls["second_s"] / len(suspect_images)
    return {"inputs": len(suspect_images), "population": sizes.cetf_population,
            "generations": sizes.cetf_generations, "second_s_per_input": per_input, **calls}


# --------------------------------------------------------------------------- report
def _cell(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def write_markdown(path: Path, report: dict) -> None:
    lines = ["# Device check", "",
             f"{report['date']}, {report['device']} ({report['backend']}), JAX {report['jax']}, "
             f"`{report['command']}`.",
             "first s includes compilation; compile s = first - second call. Training: float32, and "
             "bfloat16 compute with float32 parameters (TrainConfig.compute_dtype).", ""]
    for section, rows in report["sections"].items():
        lines += [f"## {section}", ""]
        table = rows if all(isinstance(v, dict) for v in rows.values()) else {"": rows}
        flat = {name: _flatten(row) for name, row in table.items()}
        fields = sorted({k for row in flat.values() for k in row})
        lines += ["| | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_cell(row.get(k)) for k in fields) + " |" for name, row in flat.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key} "))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes, on the CPU (tests/test_device_check.py)")
    parser.add_argument("--run", type=Path, default=HERE / "zoo-v2" / "resnet20-gtsrb-badnets")
    parser.add_argument("--train-models", nargs="*", default=None, help="models whose training is timed")
    parser.add_argument("--methods", nargs="*", default=None, help="defenses to time (default: the size's)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting calls after this")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    sizes = Sizes.cpu() if args.cpu else Sizes.device()
    changes = {"train_models": args.train_models and tuple(args.train_models),
               "methods": args.methods and tuple(args.methods), "budget_s": args.budget_s}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in changes.items() if v is not None})

    # Host-side preparation first: the model, the clean set, the suspects.
    run = checkpoint.load(args.run)
    clean, _ = split_for_defense(run, sizes.per_class, 0, args.data_dir, sizes.eval_limit)
    suspect_images = defense_benchmark.suspects(run, sizes.suspects, args.data_dir)
    clock = Clock(sizes.budget_s)
    measure = {
        "training": lambda: training(sizes, clean.info, clock),
        "defenses": lambda: defense_calls(sizes, run, clean, suspect_images, clock),
        "bna_pair_search": lambda: bna_pair_search(sizes, run, clean, clock),
        "nc_all_labels": lambda: nc_all_labels(sizes, run, clean, clock),
        "cetf_population": lambda: cetf_population(sizes, run, clean, suspect_images, clock),
        "ft_sweep": lambda: ft_sweep(sizes, args.run.resolve(), args.data_dir, clock),
    }
    sections = {}
    for name, section in measure.items():
        started = time.perf_counter()
        sections[name] = section()
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    device = jax.devices()[0]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": getattr(device, "device_kind", str(device)), "backend": jax.default_backend(),
        "jax": jax.__version__, "command": "python experiments/device_check.py" + (" --cpu" if args.cpu else ""),
        "model": args.run.name, "clean_set": len(clean), "sizes": _jsonable(dataclasses.asdict(sizes)),
        "seconds": sizes.budget_s - clock.left(), "sections": sections,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "device_check.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    write_markdown(args.out_dir / "device_check.md", report)
    print(f"wrote {args.out_dir / 'device_check.md'} in {report['seconds']:.0f} s")
    return 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    raise SystemExit(main())
