"""``bdjax`` command line: train, eval, defend, methods, sweep, demo, data verify.

Output contract (other tools parse it): ``eval --json`` prints one object with ``acc``,
``asr``, ``sia``; ``defend --json`` prints ``{"method", "before", "after", "seconds",
"der", "defense_size", "eval_size", "triggered_size", "found", "changed", "no_op"}`` (detectors add
``tpr``/``fpr`` to ``after``; ``found`` is ``bdjax.defenses.findings.summarize`` of the
defense's info, ``changed`` the number of model values that moved and their total, ``no_op``
true when the defense returned the model unchanged and no test-time rule). Fractions are in [0, 1];
a rate that does not exist (a clean model's ASR) is ``null``. The output is strict JSON (no NaN).
Progress goes to stderr (``--quiet``: none), so stdout holds only the result.
A user error (a bad flag, a missing file, an existing run as ``--out``) ends in one line on
stderr and exit status 2, never a traceback; ``data verify`` exits 1 when a file fails.

Start-up: JAX and the registries are imported only once a command runs (``bdjax --help`` and
a mistyped argument answer at once; the choices come from ``bdjax.catalog``). A command that
compiles keeps XLA's compiled programs in a persistent cache (``--compilation-cache``).
To add a subcommand: a ``cmd_NAME(args)`` function and a block in ``build_parser`` that
imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import math
import sys
import time
from pathlib import Path

from bdjax import catalog

CACHE_ENV_VAR = "BDJAX_COMPILATION_CACHE"
DEMO_SPEC = dict(dataset="gtsrb", model="medium-bn", attack="badnets",
                 attack_args={"size": 2, "location": "upper-left"}, target=14, poison_rate=0.1,
                 recipe="thesis", epochs=4, train_subset=12000, eval_limit=3000, seed=0)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as upper-left


def _parse_pairs(pairs: list[str] | None, flag: str) -> dict:
    result = {}
    for pair in pairs or []:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return result


def add_config_options(parser, config_cls):
    """One ``--field-name`` option per field of the dataclass ``config_cls``, its default the
    field's (for the ``python -m`` commands that prepare a trigger: LF's search, SSBA's encoder)."""
    defaults = config_cls()
    for field in dataclasses.fields(config_cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))


def config_from_options(args, config_cls):
    """The ``config_cls`` that ``add_config_options``' parsed options describe."""
    return config_cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config_cls)})


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``bdjax train: error: ...``); ``-h`` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, low=None, *, above: bool = False, high=None, what: str = "a number"):
    """An argparse type: ``kind`` (int/float), finite, >= ``low`` (> with ``above``), <= ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if above else value < low))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_COUNT = _number(int, 1, what="a positive whole number (leave the flag out for all)")
_POSITIVE_INT = _number(int, 1, what="a positive whole number")
_NON_NEGATIVE_INT = _number(int, 0, what="a whole number >= 0")
_POSITIVE_FLOAT = _number(float, 0.0, above=True, what="a finite number > 0")
_NON_NEGATIVE_FLOAT = _number(float, 0.0, what="a finite number >= 0")
_FRACTION = _number(float, 0.0, high=1.0, what="a fraction in [0, 1]")


def _to_json(value) -> str:
    """Strict JSON: NaN and infinities (a rate that does not exist) become null."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return json.dumps(clean(value), allow_nan=False)


def _add_data_dir(parser):
    parser.add_argument("--data-dir", default=None,
                        help="folder with cifar10/ and gtsrb/ (default: $BDJAX_DATA_DIR, then ~/.cache/bdjax)")


def _rate(value) -> str:
    """A fraction for the table; a clean model has no ASR / SIA (None or NaN)."""
    return f"{'—':>8}" if value is None or value != value else f"{value:>8.4f}"


def _print_table(rows: list[tuple[str, dict]]):
    print(f"{'':<10}{'ACC':>8}{'ASR':>8}{'SIA':>8}")
    for name, r in rows:
        print(f"{name:<10}{_rate(r['acc'])}{_rate(r.get('asr'))}{_rate(r.get('sia'))}"
              + "".join(f"  {k.upper()}{_rate(r[k])}" for k in ("tpr", "fpr") if k in r))


def cmd_train(args) -> int:
    from bdjax.runs import RunSpec, train_run
    spec = RunSpec(dataset=args.dataset, model=args.model, attack=args.attack,
                   attack_args=_parse_pairs(args.attack_arg, "--attack-arg"), target=args.target,
                   target_mode=args.target_mode, poison_rate=args.poison_rate, recipe=args.recipe,
                   epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                   learning_rate=args.lr, crop_padding=args.crop_padding, weight_decay=args.weight_decay,
                   compute_dtype=args.compute_dtype, train_subset=args.train_subset, eval_limit=args.eval_limit,
                   seed=args.seed)
    run = _finished_run(args.out, spec) if args.resume else None
    if run is None:
        config = spec.train_config()
        if not args.quiet:
            print(f"recipe {spec.recipe}: {config.optimizer} lr {config.learning_rate}, batch {config.batch_size}, "
                  f"weight decay {config.weight_decay}, "
                  f"{config.epochs} epochs; checkpoint every epoch in {Path(args.out) / 'training'}",
                  file=sys.stderr)
        run = train_run(spec, args.out, args.data_dir, progress=not args.quiet, resume=args.resume,
                        overwrite=args.overwrite)
    metrics = run.record["metrics"]
    print(f"trained {spec.model} on {spec.dataset} ({spec.attack}) in {run.record['train_seconds']:.1f} s "
          f"-> {args.out}")
    _print_table([("model", metrics)])
    return 0


def _finished_run(out, spec):
    """The run in ``out`` if it is finished and was trained from ``spec`` (``--resume`` after the end)."""
    from bdjax import checkpoint
    from bdjax.runs import RunSpec
    if not (Path(out) / checkpoint.RECORD_FILE).exists():
        return None
    run = checkpoint.load(out)
    if RunSpec.from_record(run.record["spec"]) != spec:
        raise ValueError(f"{out} holds a finished run of another spec; pass --overwrite to replace it")
    print(f"{out} is already trained", file=sys.stderr)
    return run


def cmd_eval(args) -> int:
    from bdjax import checkpoint
    from bdjax.data import load, stratified_subset
    from bdjax.evaluation import TestSets, evaluate_model
    run = checkpoint.load(args.run_dir)
    test_set = load(run.dataset, "test", args.data_dir)
    if args.eval_limit is not None:
        test_set = stratified_subset(test_set, args.eval_limit, 0)
    report = evaluate_model(run.module, run.variables, TestSets.build(test_set, run.attack, run.target))
    if args.json:
        print(_to_json(report.to_dict()))
    else:
        _print_table([("model", report.to_dict())])
    return 0


def cmd_defend(args) -> int:
    from bdjax import checkpoint
    from bdjax.defenses import findings
    from bdjax.metrics import defense_effectiveness_rating
    from bdjax.runs import defend_run
    run = checkpoint.load(args.run_dir)
    outcome = defend_run(run, args.method, clean_per_class=args.clean_per_class, seed=args.seed,
                         overrides=_parse_pairs(args.set, "--set"), data_dir=args.data_dir,
                         eval_limit=args.eval_limit, out=args.out, overwrite=args.overwrite)
    report = outcome.to_dict()
    before, after = report["before"], report["after"]
    der = (defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
           if math.isfinite(before["asr"]) else None)
    found = findings.summarize(outcome.result.info)
    changed, total = findings.changed_parameters(run.variables, outcome.result.variables)
    # A test-time rule (input filter, detector) acts without changing the weights.
    no_op = changed == 0 and outcome.result.classifier is None
    if args.json:
        print(_to_json({**{k: report[k] for k in ("method", "before", "after", "seconds", "defense_size",
                                                  "eval_size", "triggered_size")},
                        "der": der, "found": found, "changed": {"values": changed, "of": total},
                        "no_op": no_op}))
        return 0
    print(f"{args.method}: {outcome.defense_size} clean images, {outcome.seconds:.1f} s; "
          f"evaluated on {outcome.eval_size} held-out images ({outcome.triggered_size} of them triggered for ASR)")
    if found:
        print(f"found: {findings.describe(found)}")
    if no_op:
        print("NO CHANGE: the defense returned the model as it was (after = before)")
    else:
        print(f"changed {changed:,} of {total:,} model values"
              + ("; inputs are screened at test time" if outcome.result.classifier is not None else ""))
    _print_table([("before", before), ("after", after)])
    if der is not None:
        print(f"DER {der:.4f}  (1: ASR removed at no ACC cost; 0.5: no change)")
    return 0


def cmd_methods(args) -> int:
    from bdjax.defenses import DEFENSES
    from bdjax.defenses.base import config_fields
    names = args.names or sorted(DEFENSES)
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense(s) {unknown}; known: {', '.join(sorted(DEFENSES))}")
    specs = [DEFENSES[n] for n in names]
    if args.json:
        print(_to_json([{"name": s.name, "kind": s.kind, "paper": s.paper, "summary": s.summary,
                         "fields": [{"name": f, "type": t, "default": _json_default(d)}
                                    for f, t, d in config_fields(s.config_cls)]} for s in specs]))
        return 0
    show_fields = args.fields or bool(args.names)
    width = max(len("method"), *(len(s.name) for s in specs))
    print(f"{'method':<{width}}  {'kind':<12}  paper / summary")
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.kind:<12}  {spec.paper}")
        print(f"{'':<{width}}  {'':<12}  {spec.summary}")
        if show_fields:
            print(_fields_text(spec.config_cls, indent=width + 16))
    if not show_fields:
        print("\nconfig fields (--set FIELD=VALUE) with types and defaults: bdjax methods NAME, "
              "bdjax methods --fields, or bdjax defend NAME --help")
    return 0


def _json_default(value):
    """A field default for JSON: numbers, strings, None and tuples as they are, anything else as repr."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return repr(value)


def _fields_text(config_cls, indent: int = 2) -> str:
    """The ``--set`` fields of a defense config, one per line: ``name  type  = default``."""
    from bdjax.defenses.base import config_fields
    rows = config_fields(config_cls)
    if not rows:
        return " " * indent + "(no fields)"
    name_width = max(len(name) for name, _, _ in rows)
    type_width = max(len(kind) for _, kind, _ in rows)
    return "\n".join(f"{' ' * indent}{name:<{name_width}}  {kind:<{type_width}}  "
                     + ("(required)" if default is dataclasses.MISSING else f"= {default!r}")
                     for name, kind, default in rows)


def cmd_demo(args) -> int:
    from bdjax import checkpoint
    from bdjax.runs import RunSpec, defend_run, train_run
    spec = RunSpec(**DEMO_SPEC)
    print(f"1/2 planting a BadNets backdoor (2x2 yellow patch, target {spec.target}, "
          f"{spec.poison_rate:.0%} poison) in {spec.model} on {spec.train_subset} real GTSRB images")
    started = time.perf_counter()
    if not args.reuse and (Path(args.out) / checkpoint.RECORD_FILE).exists():
        raise ValueError(f"{args.out} already holds a trained model: pass --reuse to defend it again, "
                         "or choose another --out")
    try:
        run = checkpoint.load(args.out) if args.reuse else None
    except checkpoint.CheckpointError:
        run = None
    if run is None:
        run = train_run(spec, args.out, args.data_dir)
    print(f"2/2 defending with {args.method} using {args.clean_per_class} clean test images per class")
    outcome = defend_run(run, args.method, clean_per_class=args.clean_per_class, seed=0,
                         data_dir=args.data_dir, eval_limit=spec.eval_limit)
    report = outcome.to_dict()
    print(f"\nevaluated on {outcome.eval_size} held-out test images; defense took "
          f"{outcome.seconds:.1f} s; total {time.perf_counter() - started:.0f} s")
    _print_table([("before", report["before"]), ("after", report["after"])])
    return 0


def cmd_sweep(args) -> int:
    import jax

    from bdjax import progress, sharding, sweep

    config = sweep.load_config(args.config, args.variant)
    out = Path(args.out or Path("runs") / "sweeps" / config.name)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not args.table:
        if args.distributed:
            jax.distributed.initialize()
        mesh = None if args.no_shard else sharding.sweep_mesh()
        vectorise = True if args.vmap else False if args.sequential else None  # None: the faster mode
        sweep.run_sweep(config, out, data_dir=args.data_dir, mesh=mesh, vectorise=vectorise, log=progress.LOGGER.info)
    table = sweep.results_table(sweep.load_records(out))
    (out / "RESULTS.md").write_text(f"# Sweep {config.name} ({args.variant})\n\n{table}")
    print(table)
    return 0


def cmd_data_verify(args) -> int:
    from bdjax.data.locations import data_root
    from bdjax.data.verify import verify_folder
    root = data_root(args.data_dir)
    checks = verify_folder(root, args.sums)
    for check in checks:
        print(check.describe())
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        print(f"bdjax data verify: error: {len(bad)} of {len(checks)} file(s) in {root} failed "
              "verification; replace them", file=sys.stderr)
        return 1
    print(f"{len(checks)} file(s) in {root} match their checksums")
    return 0


class _DefendHelp(argparse.Action):
    """``-h`` of ``bdjax defend``: after ``defend METHOD``, also that method's ``--set`` fields."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show this help and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        method = getattr(namespace, "method", None)
        if method in catalog.DEFENSE_NAMES:
            from bdjax.defenses import DEFENSES
            spec = DEFENSES[method]
            parser.epilog = (f"{method} ({spec.kind}; {spec.paper}): {spec.summary}\n\n"
                             f"--set fields (FIELD=VALUE; nested: FIELD=\"{{'inner': VALUE}}\"):\n"
                             + _fields_text(spec.config_cls))
        else:
            parser.epilog = "bdjax defend METHOD --help lists that method's --set fields; bdjax methods lists all."
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; it imports nothing heavy (choices from ``bdjax.catalog``)."""
    parser = _Parser(prog="bdjax", description="Backdoor attacks and defenses in JAX.")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                        help=f"folder of JAX's persistent compilation cache (default: ${CACHE_ENV_VAR}, "
                             "then ~/.cache/bdjax/jax-compilation; safe to delete); 'off' disables it")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a backdoored (or clean) model into a run directory")
    p.add_argument("--dataset", choices=catalog.DATASET_NAMES, default="gtsrb")
    p.add_argument("--model", choices=catalog.MODEL_NAMES, default="resnet20")
    p.add_argument("--attack", choices=catalog.ATTACK_NAMES + ("none",), default="badnets")
    p.add_argument("--attack-arg", action="append", metavar="KEY=VALUE",
                   help="attack parameter, e.g. size=3 location=random (repeatable)")
    p.add_argument("--target", type=_NON_NEGATIVE_INT, default=0)
    p.add_argument("--target-mode", choices=["all_to_one", "all_to_all"], default="all_to_one")
    p.add_argument("--poison-rate", type=_FRACTION, default=0.1)
    p.add_argument("--recipe", choices=catalog.RECIPE_NAMES, default="default",
                   help="training recipe (bdjax/recipes.py; the README's table)")
    p.add_argument("--epochs", type=_POSITIVE_INT, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=None, help="override the recipe's batch size")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=None, help="override the recipe's optimizer")
    p.add_argument("--lr", type=_POSITIVE_FLOAT, default=None, help="override the recipe's (peak) learning rate")
    p.add_argument("--crop-padding", type=_NON_NEGATIVE_INT, default=None,
                   help="override the recipe's random-crop padding (0: no crops)")
    p.add_argument("--weight-decay", type=_NON_NEGATIVE_FLOAT, default=None,
                   help="override the recipe's weight decay (default recipe: 5e-4, CIFAR 1e-4)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16: mixed precision (bf16 forward/backward, float32 parameters and loss)")
    p.add_argument("--train-subset", type=_COUNT, default=None, help="stratified subset of N training images")
    p.add_argument("--eval-limit", type=_COUNT, default=None, help="evaluate on a stratified subset of N test images")
    p.add_argument("--seed", type=_NON_NEGATIVE_INT, default=0)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished training in --out (checkpointed every epoch)")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_dir(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ACC/ASR/SIA of a run on the test split")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--eval-limit", type=_COUNT, default=None, help="evaluate on a stratified subset of N test images")
    _add_data_dir(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("defend", help="apply a defense to a run and report before/after", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action=_DefendHelp)
    p.add_argument("method", choices=catalog.DEFENSE_NAMES, help="a defense (bdjax methods lists them)")
    p.add_argument("run_dir")
    p.add_argument("--clean-per-class", type=_POSITIVE_INT, default=2,
                   help="clean images per class drawn from the test split (held out of evaluation)")
    p.add_argument("--seed", type=_NON_NEGATIVE_INT, default=0)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--eval-limit", type=_COUNT, default=None, help="evaluate on a stratified subset of N held-out images")
    p.add_argument("--out", default=None, help="write the repaired model as a new run directory")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds (even the input run)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_data_dir(p)
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser("methods", help="the defenses: kind, paper, summary and --set fields with defaults")
    p.add_argument("names", nargs="*", metavar="METHOD", help="only these (and show their fields)")
    p.add_argument("--fields", action="store_true", help="show every method's --set fields")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("sweep", help="run a defense sweep from a Python config (resumable, vmapped, sharded)")
    p.add_argument("config", help="Python file with get_config(variant) -> bdjax.sweep.SweepConfig")
    p.add_argument("--variant", default="local", help="passed to get_config (e.g. local, full)")
    p.add_argument("--out", default=None, help="record folder (default runs/sweeps/NAME)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true", help="run settings one by one (no vmap)")
    mode.add_argument("--vmap", action="store_true",
                      help="vmap the settings even where a loop is faster (FT on CPU); default: the faster")
    p.add_argument("--no-shard", action="store_true", help="do not split the vmapped axis over devices")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--table", action="store_true", help="only print the table of the stored records")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_data_dir(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="plant a backdoor in a small model on real GTSRB and defend it")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--method", choices=catalog.DEFENSE_NAMES, default="ft")
    p.add_argument("--clean-per-class", type=_POSITIVE_INT, default=5)
    p.add_argument("--reuse", action="store_true", help="reuse the trained model in --out if present")
    _add_data_dir(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="work with the data folder")
    data_sub = p.add_subparsers(dest="data_command", metavar="{verify}", required=True)
    p = data_sub.add_parser("verify", help="check the data files against known checksums (and a SHA256SUMS file)")
    p.add_argument("--sums", default=None,
                   help="a sha256sum-format file of paths relative to the data folder (default: its SHA256SUMS)")
    _add_data_dir(p)
    p.set_defaults(func=cmd_data_verify)

    from bdjax.interop.cli import add_parsers as add_torch_parsers  # import-torch, export-torch; JAX- and torch-free
    add_torch_parsers(sub)
    return parser


def _use_compilation_cache(setting: str | None):
    """Keep XLA's compiled programs between runs (a second ``defend`` skips most compilation).

    ``setting``: a folder, or "off"; None takes $BDJAX_COMPILATION_CACHE, then the user cache."""
    import jax

    from bdjax.data.locations import cache_dir
    setting = setting or os.environ.get(CACHE_ENV_VAR) or str(cache_dir() / "jax-compilation")
    if setting.lower() in ("off", "0", "none", "false"):
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(setting).expanduser()))
    # Every program, however quick to compile: a defense compiles dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    from bdjax import progress
    progress.show_on_stderr(not getattr(args, "quiet", False))
    try:
        if args.command not in ("methods", "data"):
            _use_compilation_cache(args.compilation_cache)
        return args.func(args)
    except (ValueError, TypeError, FloatingPointError, OSError) as err:
        # CheckpointError, DataFileError, ChecksumError are ValueErrors; DataNotFoundError and a
        # missing file or an existing one in the way of --out are OSErrors.
        print(f"bdjax {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
