"""``bdjax import-torch`` and ``bdjax export-torch``: PyTorch checkpoints in and out of run directories.

``add_parsers(sub)`` adds both commands to the ``bdjax`` parser; neither imports torch until it
runs, so ``bdjax --help`` stays fast and works without PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

from bdjax import catalog
from bdjax.interop import TORCH_MODELS


def import_torch(args) -> int:
    from bdjax import checkpoint, models
    from bdjax.cli import _parse_pairs
    from bdjax.interop import torch as interop
    from bdjax.runs import RunSpec, make_attack

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace the run it holds")
    source = _without_import_error(interop.load_file, args.file)
    metadata = source.metadata
    model, dataset = _from_metadata(args, metadata)
    info = interop.dataset_info(dataset)
    if "num_classes" in metadata and int(metadata["num_classes"]) != info.num_classes:
        raise interop.TorchInteropError(f"{args.file} is a {metadata['num_classes']}-class model but {dataset} has "
                                        f"{info.num_classes} classes")
    mean, std, how = _normalization(args, metadata, info)
    resolved = interop.resolve_model(model, source.state_dict)
    module = models.create(resolved, interop.with_normalization(info, mean, std))
    variables = interop.from_state_dict(source.state_dict, module, info.image_shape, model_name=resolved)
    if args.attack == "none":
        attack, target = None, None
    else:
        spec = RunSpec(dataset=dataset, model=resolved, attack=args.attack,
                       attack_args=_parse_pairs(args.attack_arg, "--attack-arg"), target=args.target,
                       target_mode=args.target_mode, seed=args.seed)
        attack, target = make_attack(spec, info)
    imported = {"file": str(Path(args.file).resolve()), "sha256": source.sha256, "format": source.format,
                "keys_used": source.keys_used, "keys_ignored": source.keys_ignored,
                "metadata": {k: _jsonable(v) for k, v in metadata.items()}, "requested_model": model}
    record = {"dataset": dataset, "model": resolved, "imported_from": imported,
              checkpoint.INPUT_NORMALIZATION: {"mean": list(mean), "std": list(std), "source": how}}
    checkpoint.save(out, variables, record, attack, target)
    checkpoint.load(out)  # the run reads back and fits the architecture
    summary = {"run": str(out), "model": resolved, "dataset": dataset, "format": source.format,
               "keys_used": source.keys_used, "keys_ignored": source.keys_ignored,
               "normalization": {"mean": list(mean), "std": list(std), "source": how},
               "attack": args.attack, "tensors": len(source.state_dict)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"imported {args.file} ({source.format}; keys used: {', '.join(source.keys_used)}"
          + (f"; ignored: {', '.join(source.keys_ignored)}" if source.keys_ignored else "") + ")")
    if resolved != model:
        print(f"model: {resolved} ({interop.VARIANT_NOTES[resolved]})")
    print(f"inputs: {how}, folded into the model (it takes [0, 1] images)")
    print(f"-> {out} ({resolved} on {dataset}, attack {args.attack})")
    return 0


def export_torch(args) -> int:
    from bdjax import checkpoint
    from bdjax.interop import torch as interop

    run = checkpoint.load(args.run_dir)
    model = run.record["model"]
    if model not in TORCH_MODELS and model != "mobilenet-v2":  # that one: to_state_dict says what differs
        raise interop.TorchInteropError(f"{args.run_dir} holds {model}, which has no PyTorch layout; "
                                        f"supported: {', '.join(TORCH_MODELS)}")
    image_shape = tuple(run.module.image_shape) if run.module.image_shape else (32, 32, 3)
    state = interop.to_state_dict(run.module, run.variables, image_shape)
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    _without_import_error(interop.save_state_dict, args.out, state)
    summary = {"file": args.out, "model": model, "tensors": len(state),
               "normalization": {"mean": list(run.module.mean), "std": list(run.module.std)}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {len(state)} tensors, a state_dict for bdjax.interop.torch_models."
              f"build({model!r}, {run.module.num_classes})")
        print(f"its inputs: (x - mean) / std with mean {list(run.module.mean)}, std {list(run.module.std)} "
              "(x in [0, 1])")
    return 0


def _without_import_error(fn, *args):
    """``fn(*args)``, with a missing PyTorch as a user error (one line from ``bdjax``, exit 2)."""
    try:
        return fn(*args)
    except ImportError as err:
        raise ValueError(str(err)) from None


def _from_metadata(args, metadata: dict) -> tuple[str, str]:
    """--model / --dataset, checked against (or taken from) BackdoorBench's metadata."""
    from bdjax.interop import torch as interop
    recorded_model = interop.BACKDOORBENCH_MODELS.get(str(metadata.get("model_name")))
    if "model_name" in metadata and recorded_model is None:
        raise interop.TorchInteropError(f"{args.file} holds BackdoorBench model {metadata['model_name']!r}, which "
                                        f"bdjax cannot read; supported: {', '.join(interop.BACKDOORBENCH_MODELS)}")
    model = args.model or recorded_model
    if model is None:
        raise ValueError("--model is needed: the file does not record its architecture")
    if recorded_model and args.model and _family(args.model) != _family(recorded_model):
        raise interop.TorchInteropError(f"--model {args.model} but {args.file} records model_name "
                                f"{metadata['model_name']!r} ({recorded_model})")
    dataset = args.dataset or metadata.get("clean_data")
    if dataset is None:
        raise ValueError("--dataset is needed: the file does not record its dataset")
    if args.dataset and "clean_data" in metadata and args.dataset != metadata["clean_data"]:
        raise interop.TorchInteropError(f"--dataset {args.dataset} but {args.file} records clean_data "
                                f"{metadata['clean_data']!r}")
    return model, dataset


def _family(model: str) -> str:
    """The architecture a model name stands for, whichever of its PyTorch variants."""
    return {"preact-resnet18-backdoorbench": "preact-resnet18", "mobilenet-v2-torchvision": "mobilenet-v2"}.get(model, model)


def _normalization(args, metadata: dict, info):
    from bdjax.interop.torch import BACKDOORBENCH_NORMALIZATION, parse_normalization
    if args.normalize is not None:
        return parse_normalization(args.normalize, info.image_shape[-1])
    recorded = metadata.get("clean_data")
    if recorded in BACKDOORBENCH_NORMALIZATION:
        mean, std = BACKDOORBENCH_NORMALIZATION[recorded]
        return mean, std, f"BackdoorBench's {recorded} normalisation (from the file's clean_data)"
    raise ValueError("--normalize is needed: how were the PyTorch model's inputs normalised? "
                     f"({', '.join(BACKDOORBENCH_NORMALIZATION)}, none, or MEAN,STD)")


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def add_parsers(sub):
    """Add ``import-torch`` and ``export-torch`` to the ``bdjax`` subcommands ``sub``."""
    p = sub.add_parser("import-torch", help="read a PyTorch state_dict or BackdoorBench attack result into a run")
    p.add_argument("file", help="a state_dict, or BackdoorBench's attack_result.pt (state_dict under 'model')")
    p.add_argument("--model", choices=(*TORCH_MODELS, "mobilenet-v2"), default=None,
                   help="the architecture (default: the file's BackdoorBench model_name)")
    p.add_argument("--dataset", choices=catalog.DATASET_NAMES, default=None,
                   help="the dataset (default: the file's BackdoorBench clean_data)")
    p.add_argument("--normalize", default=None, metavar="cifar10|cifar100|gtsrb|none|MEAN,STD",
                   help="how the PyTorch pipeline normalised inputs (dataset names: BackdoorBench's values; "
                        "default: from the file's clean_data); folded into the imported model")
    p.add_argument("--attack", choices=catalog.ATTACK_NAMES + ("none",), default="none", help="the attack the model was trained with (for ASR); default none")
    p.add_argument("--attack-arg", action="append", metavar="KEY=VALUE", help="attack parameter (repeatable)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--target-mode", choices=["all_to_one", "all_to_all"], default="all_to_one")
    p.add_argument("--seed", type=int, default=0, help="seed the attack's trigger is drawn from (as in bdjax train)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=import_torch)

    p = sub.add_parser("export-torch", help="write a run's model as a PyTorch state_dict")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the .pt file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=export_torch)
