"""The two workflows everything else is built from: plant a backdoor, and defend a run.

``train_run`` loads real data, poisons it, trains, evaluates and writes a run directory.
``defend_run`` draws the defender's clean set from held-out data, applies a defense and
measures ACC/ASR/SIA before and after on the images that were not given to the defense.
The CLI, the experiments and the tests all call these two functions.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bdjax import attacks as attacks_lib
from bdjax import checkpoint, defenses, models, progress, recipes
from bdjax.attacks.base import TargetMap, poison_training_set
from bdjax.data import clean_defense_split, load, stratified_subset
from bdjax.data.dataset import INFOS, Dataset
from bdjax.evaluation import Report, TestSets, evaluate, evaluate_model, model_classifier
from bdjax.models.inference import check_finite_variables
from bdjax.training import COMPUTE_DTYPES, TrainConfig, train, train_many, unstack_models


# The training fields of a RunSpec: None takes the recipe's value.
TRAINING_FIELDS = ("epochs", "batch_size", "optimizer", "learning_rate", "crop_padding", "weight_decay",
                   "compute_dtype")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What to train. Defaults: the ``default`` recipe (``bdjax.recipes``) on the full training
    split, BadNets at 10% poison; ``epochs`` .. ``compute_dtype`` override single recipe fields."""

    dataset: str = "gtsrb"
    model: str = "resnet20"
    attack: str = "badnets"  # or "none" for a clean model
    attack_args: dict = dataclasses.field(default_factory=dict)
    target: int = 0
    target_mode: str = "all_to_one"
    poison_rate: float = 0.1
    recipe: str = "default"
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    crop_padding: int | None = None
    weight_decay: float | None = None
    compute_dtype: str | None = None  # "bfloat16": mixed precision (bdjax.training.TrainConfig)
    train_subset: int | None = None  # stratified subset of the training split
    eval_limit: int | None = None  # stratified subset of the test split for the record's metrics
    seed: int = 0  # the data: training subset, trigger, poisoned images, evaluation subset
    # The model: its init, data order and augmentation (None: ``seed``). Models that differ only
    # here share one poisoned training set and can be trained at once (``train_runs``).
    model_seed: int | None = None

    def __post_init__(self):
        # Everything that can be wrong fails here, naming the field, not after loading the data.
        recipes.get(self.recipe)
        if self.dataset not in INFOS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(sorted(INFOS))}")
        if self.model not in models.MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(models.MODEL_NAMES)}")
        if not isinstance(self.attack_args, dict):
            raise TypeError(f"attack_args must be a dict, got {type(self.attack_args).__name__}")
        if self.attack == "none":
            if self.attack_args:
                raise ValueError(f"attack_args {self.attack_args} given for attack 'none' (a clean model)")
        else:
            attacks_lib.base.check_args(self.attack, self.attack_args)
            TargetMap(self.target_mode, self.target, INFOS[self.dataset].num_classes)
            if attacks_lib.ATTACKS[self.attack].clean_label and self.target_mode != "all_to_one":
                raise ValueError(f"{self.attack} is clean-label and supports all_to_one targets only")
        _check_number("poison_rate", self.poison_rate, float, low=0.0, high=1.0)
        _check_number("seed", self.seed, int, low=0)
        for name, kind, low in (("epochs", int, 1), ("batch_size", int, 1), ("learning_rate", float, 0.0),
                                ("crop_padding", int, 0), ("train_subset", int, 1), ("eval_limit", int, 1),
                                ("model_seed", int, 0), ("weight_decay", float, 0)):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), kind, low=low, above=name == "learning_rate")
        if self.optimizer not in (None, "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.compute_dtype not in (None, *COMPUTE_DTYPES):
            raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @classmethod
    def from_record(cls, spec: dict) -> "RunSpec":
        """The spec a run's ``record.json`` stores (fields it predates take their defaults).

        Records from before recipes stored every training field and meant the thesis recipe;
        they come back as ``recipe="thesis"`` with the fields that differ from it.
        """
        spec = dict(spec)
        if "recipe" not in spec:
            thesis = recipes.get("thesis").train_config(spec.get("dataset", "gtsrb"))
            spec["recipe"] = "thesis"
            own_optimizer = spec.get("optimizer", thesis.optimizer) != thesis.optimizer
            for name in TRAINING_FIELDS:
                # Another optimizer's rate stays explicit: left out it would take that optimizer's own.
                if name == "learning_rate" and own_optimizer:
                    continue
                if name in spec and spec[name] == getattr(thesis, name):
                    spec[name] = None
        return cls(**spec)

    def train_config(self) -> TrainConfig:
        return recipes.get(self.recipe).train_config(
            self.dataset, **{name: getattr(self, name) for name in TRAINING_FIELDS})


def _check_number(name: str, value, kind, *, low=None, high=None, above: bool = False):
    """Raise unless ``value`` is a finite ``kind`` (int accepted for float) within [low, high]
    (> low with ``above``); the message names the field and, for counts, says 0 is not "all"."""
    kinds = (int,) if kind is int else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite {'whole number' if kind is int else 'number'}, got {value!r}")
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        bounds = f"> {low}" if above else f"in [{low}, {high}]" if high is not None else f">= {low}"
        hint = " (None, not 0, means all)" if name in ("train_subset", "eval_limit") else ""
        raise ValueError(f"{name} must be {bounds}, got {value!r}{hint}")


def make_attack(spec: RunSpec, info) -> tuple[attacks_lib.Attack | None, TargetMap | None]:
    if spec.attack == "none":
        return None, None
    key = jax.random.fold_in(jax.random.key(spec.seed), 1)
    attack = attacks_lib.make(spec.attack, key, info.image_shape, **spec.attack_args)
    return attack, TargetMap(spec.target_mode, spec.target, info.num_classes)


def train_run(spec: RunSpec, out, data_dir=None, progress: bool = True, *, resume: bool = False,
              overwrite: bool = False) -> checkpoint.Run:
    """Train the model ``spec`` describes on (poisoned) real data and save it into ``out``."""
    return train_runs([spec], [out], data_dir, progress, resume=resume, overwrite=overwrite)[0]


def _check_outputs(outs: list[Path], resume: bool, overwrite: bool):
    """Refuse to replace a finished run or drop an unfinished one unless asked to.

    ``overwrite`` with ``resume``: a retraining that replaces a finished run and was killed
    keeps its epochs (its checkpoint is resumed, and must be of the same training).
    """
    for out in outs:
        partial = out / checkpoint.TRAINING_DIR
        if overwrite:
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)
        elif (out / checkpoint.RECORD_FILE).exists():
            raise ValueError(f"{out} already holds a trained run; pass --overwrite (overwrite=True) to replace it")
        elif (partial / checkpoint.TRAINING_META).exists() and not resume:
            raise ValueError(f"{out} holds an unfinished training run; pass --resume (resume=True) to "
                             "continue it or --overwrite to start again")
        elif out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")


def train_runs(specs: list[RunSpec], outs: list, data_dir=None, progress: bool = True,
               vectorise: bool | None = None, *, resume: bool = False,
               overwrite: bool = False) -> list[checkpoint.Run]:
    """Train several models of one recipe at once (vmapped, ``train_many``) and save each.

    The specs may differ only in ``model_seed``: they share the poisoned training set (drawn
    from ``seed``) and get their own init, data order and augmentation. This is how a
    table over "several models per architecture" is trained in one program.
    ``vectorise``: one vmapped program (default on accelerators) or one ``train`` per model
    on the same data (default on CPU, where vmapping convolutions over parameter sets makes
    grouped convolutions that run slower than a loop; see experiments/results/sweep_benchmark.md).

    Every epoch's training state is checkpointed in ``OUT/training/`` (removed once the run is
    saved). ``resume``: continue such an unfinished run (same spec) where it stopped; the result
    equals an uninterrupted run's. ``overwrite``: replace what ``out`` holds (with ``resume``, an
    unfinished retraining in ``out`` continues); without it a finished run in ``out`` is an
    error, and so is an unfinished one without ``resume``.
    """
    if not specs or len(specs) != len(outs):
        raise ValueError(f"need one output directory per spec, got {len(specs)} specs and {len(outs)} outputs")
    outs = [Path(out) for out in outs]
    spec = specs[0]
    for other in specs[1:]:
        if dataclasses.replace(other, model_seed=spec.model_seed) != spec:
            raise ValueError("train_runs: the specs may differ only in model_seed; "
                             f"{other} differs from {spec} elsewhere")
    _check_outputs(outs, resume, overwrite)
    started = time.perf_counter()
    train_set = load(spec.dataset, "train", data_dir)
    test_set = load(spec.dataset, "test", data_dir)
    seed_key = jax.random.key(spec.seed)
    if spec.train_subset:
        train_set = stratified_subset(train_set, spec.train_subset, jax.random.fold_in(seed_key, 0))
    jointly_trained = spec.attack in attacks_lib.TRAINED_WITH_MODEL
    if jointly_trained:  # the trigger is trained with the classifier: no poisoned set beforehand
        attack, target = None, TargetMap(spec.target_mode, spec.target, train_set.info.num_classes)
    else:
        attack, target = make_attack(spec, train_set.info)
    poison_count = 0
    if attack is not None:
        poisoned = poison_training_set(train_set, attack, target, jax.random.fold_in(seed_key, 2),
                                       rate=spec.poison_rate)
        train_set, poison_count = poisoned.dataset, int(poisoned.poison_indices.size)
    module = models.create(spec.model, train_set.info)
    model_seeds = [spec.seed if s.model_seed is None else s.model_seed for s in specs]
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 3) for s in model_seeds])
    if vectorise is None:
        vectorise = jax.default_backend() != "cpu"
    config = spec.train_config()
    note = recipes.few_steps_note(config, len(train_set))
    if note and progress:
        print(note, file=sys.stderr, flush=True)
    attacks = [attack] * len(specs)
    if jointly_trained:
        results = [attacks_lib.TRAINED_WITH_MODEL[spec.attack](spec, module, train_set, target, key, config, progress,
                                                               checkpoint_dir=out / checkpoint.TRAINING_DIR)
                   for key, out in zip(keys, outs)]
        trained, attacks = [r.variables for r in results], [r.attack for r in results]
        histories, seconds = [r.history for r in results], [r.seconds for r in results]
        poison_count = results[0].poison_count
        vectorise = False
    elif vectorise:
        result = train_many(module, train_set, config, keys, progress=progress,
                            checkpoint_dir=outs[0] / checkpoint.TRAINING_DIR)
        trained = unstack_models(result.variables, len(specs))
        histories = [[{k: float(v[i]) for k, v in h.items()} for h in result.history] for i in range(len(specs))]
        seconds = [result.seconds] * len(specs)
    else:
        results = [train(module, train_set, config, key, progress=progress,
                         checkpoint_dir=out / checkpoint.TRAINING_DIR) for key, out in zip(keys, outs)]
        trained = [r.variables for r in results]
        histories = [r.history for r in results]
        seconds = [r.seconds for r in results]
    eval_set = test_set
    if spec.eval_limit:
        eval_set = stratified_subset(test_set, spec.eval_limit, jax.random.fold_in(seed_key, 4))
    sets = TestSets.build(eval_set, attack, target)
    runs = []
    for i, (one_spec, out, variables) in enumerate(zip(specs, outs, trained)):
        if jointly_trained:  # every model has its own trigger generator
            sets = TestSets.build(eval_set, attacks[i], target)
        report = evaluate_model(module, variables, sets)
        record = {
            "dataset": spec.dataset, "model": spec.model, "spec": dataclasses.asdict(one_spec),
            "train_config": dataclasses.asdict(config), "poison_count": poison_count,
            "train_size": len(train_set), "eval_size": len(eval_set), "metrics": report.to_dict(),
            # Vectorised: wall-clock of the shared program (every model reports the same time).
            "train_seconds": seconds[i], "total_seconds": time.perf_counter() - started,
            "images_per_second": len(train_set) * config.epochs * len(specs) / max(seconds[i], 1e-9)
            if vectorise else len(train_set) * config.epochs / max(seconds[i], 1e-9),
            "trained_together": len(specs), "vectorised": bool(vectorise),
            "history": histories[i],
            "backend": jax.default_backend(),
        }
        checkpoint.save(out, variables, record, attacks[i], target)
        runs.append(checkpoint.load(out))
    for out in outs:
        shutil.rmtree(out / checkpoint.TRAINING_DIR, ignore_errors=True)
    return runs


@dataclasses.dataclass
class DefenseOutcome:
    method: str
    before: Report
    after: Report
    seconds: float
    result: defenses.DefenseResult
    defense_size: int
    eval_size: int  # clean evaluation images (ACC)
    triggered_size: int = 0  # triggered evaluation images (ASR, SIA): the clean ones the attack relabels

    def to_dict(self) -> dict:
        return {"method": self.method, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "seconds": self.seconds, "defense_size": self.defense_size, "eval_size": self.eval_size,
                "triggered_size": self.triggered_size}


def split_for_defense(run: checkpoint.Run, clean_per_class: int, seed: int, data_dir=None,
                      eval_limit: int | None = None) -> tuple[Dataset, TestSets]:
    """The defender's clean set (k per class from the test split) and the evaluation sets (the rest)."""
    if eval_limit is not None:
        _check_number("eval_limit", eval_limit, int, low=1)
    test_set = load(run.dataset, "test", data_dir)
    defense_set, eval_set = clean_defense_split(test_set, clean_per_class, seed)
    if eval_limit is not None:
        eval_set = stratified_subset(eval_set, eval_limit, seed + 1)
    return defense_set, TestSets.build(eval_set, run.attack, run.target)


def _check_defense_output(out: Path, run: checkpoint.Run, overwrite: bool):
    """Refuse to replace an existing run (or anything else) at ``out`` unless asked to."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    own = run.path is not None and out.resolve() == Path(run.path).resolve()
    what = ("the run being defended" if own else "a run" if (out / checkpoint.RECORD_FILE).exists()
            else "files")
    raise ValueError(f"--out {out} already holds {what}; pass --overwrite (overwrite=True) to replace it")


def defend_run(run: checkpoint.Run, method: str, *, clean_per_class: int = 2, seed: int = 0,
               overrides: dict | None = None, data_dir=None, eval_limit: int | None = None,
               out=None, overwrite: bool = False) -> DefenseOutcome:
    """Apply defense ``method`` to ``run`` and measure it; optionally save the repaired run.

    ``out``: a new run directory for the repaired model; one that exists and is not empty
    (the defended run's own directory included) is replaced only with ``overwrite``.
    """
    spec = defenses.get(method)
    config = defenses.make_config(spec.config_cls, overrides or {})
    if out is not None:
        _check_defense_output(Path(out), run, overwrite)
    with progress.stage(f"loading {run.dataset} test split"):
        defense_set, sets = split_for_defense(run, clean_per_class, seed, data_dir, eval_limit)
    sizes = f"{len(sets.clean)} clean + {len(sets.triggered)} triggered images"
    with progress.stage(f"evaluating the model before {method} on {sizes}"):
        before = evaluate_model(run.module, run.variables, sets)
    with progress.stage(f"defending with {method} ({len(defense_set)} clean images)"):
        started = time.perf_counter()
        result = spec.fn(run.module, run.variables, defense_set, jax.random.key(seed), config)
        jax.block_until_ready(result.variables)
        seconds = time.perf_counter() - started
    check_finite_variables(result.variables, f"the variables {method} returned")
    classifier = result.classifier or model_classifier(run.module, result.variables)
    with progress.stage(f"evaluating the defended model on {sizes}"):
        after = evaluate(classifier, sets, detector=spec.detector)
    outcome = DefenseOutcome(method, before, after, seconds, result, len(defense_set), len(sets.clean),
                             len(sets.triggered))
    if out is not None:
        record = dict(run.record, defense={**outcome.to_dict(), "config": dataclasses.asdict(config),
                                           "clean_per_class": clean_per_class, "seed": seed})
        checkpoint.save(Path(out), result.variables, record, run.attack, run.target)
    return outcome
