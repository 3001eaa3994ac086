"""CETF Tables II / III on zoo v2: the input filters on 200 + 200 inputs per clean-set draw.

    BDJAX_DATA_DIR=../shared/data python experiments/filter_tables.py                  # resumes
    BDJAX_DATA_DIR=../shared/data python experiments/filter_tables.py --methods strip neo februus  # no CETF
    BDJAX_DATA_DIR=../shared/data python experiments/filter_tables.py --table-only
    BDJAX_DATA_DIR=../shared/data python experiments/filter_tables.py --only resnet20-gtsrb-badnets-br \
        --methods cetf-pop10 cetf-pop20 cetf-pop30       # Table IV: CETF's population size
    BDJAX_DATA_DIR=../shared/data python experiments/filter_tables.py --record cetf_tables_v2_februus_train_inpainter \
        --februus-train-images 39209 --only resnet20-gtsrb-badnets-inner resnet20-gtsrb-badnets-br --methods februus
        # an ablation: Februus' generator trained on the whole clean training split

Per zoo v2 model and seed (the defender's clean-set draw: 2 test images per class, the CETF
paper's setting; the defenses' own randomness follows the seed):

- inputs: ``--inputs`` triggered test images (non-target classes, the attack applied; not only
  those the attack wins, so the ASR is the attack's over them) and ``--inputs`` clean ones, both
  spread evenly over the rest of the test split;
- methods: ``none`` (the model alone), ``cetf`` (the paper's search and rule), ``cetf-region-limit``
  (ours, an ablation: the same search, regions larger than a limit set on the defender's clean
  images count as clean, ``cetf.calibrate_max_region`` with ``--calibration-size``), ``strip``,
  ``neo`` and ``februus`` with the library's defaults; ``cetf-popP`` (Table IV): the paper's search
  and rule with a population of P instead of 40, on the triggered inputs only (Table IV reports
  the ASR left: triggered inputs CETF does not flag that the model sends to the target), so these
  rows have no ACC, FPR or DER;
- numbers, the paper's convention: ACC = clean inputs accepted and classified right, ASR =
  triggered inputs accepted and sent to the target (a rejected input counts as a failure), TPR /
  FPR = triggered / clean inputs rejected (Februus rejects nothing: it purifies), DER from the
  model's own ACC / ASR on the same inputs.

CETF screens for hours on a CPU (~15 s an input for a ResNet-20 on one free core); its screening
is kept in chunks under ``results/cetf_screens/`` (not committed) so that a killed run resumes
where it stopped. Cells go to ``results/cetf_tables_v2.json`` (``tables.CellRecord``), the
Markdown beside it is regenerated from it, and the results book's summary reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import checkpoint
from bdjax.data import load, stratified_subset
from bdjax.data.dataset import to_float
from bdjax.defenses import cetf, februus, gradcam
from bdjax.metrics import defense_effectiveness_rating
from bdjax.models.inference import predict
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)
from cetf_tables import filter_scores, spread  # noqa: E402

RECORD = "cetf_tables_v2"
RUNS = ("resnet20-gtsrb-badnets-br", "resnet20-gtsrb-badnets", "resnet20-gtsrb-blended", "resnet20-gtsrb-wanet",
        "resnet20-gtsrb-sig")
POPULATIONS = (10, 20, 30)  # Table IV's smaller populations; 40 (the default) is the "cetf" row
METHODS = ("none", "strip", "neo", "cetf", "cetf-region-limit", "februus", *(f"cetf-pop{p}" for p in POPULATIONS))
SCREENS = tables.RESULTS / "cetf_screens"
PER_CLASS = 2
# Tables II / III, GTSRB ResNet-20 under the paper's BadNets (its bottom-right patch): ACC / ASR
# after each filter; the undefended model 99.97 / 99.18.
PAPER_BEFORE = (0.9997, 0.9918)
PAPER = {"cetf": (0.9997, 0.0), "strip": (0.7766, 0.5504), "februus": (0.7702, 0.0049), "neo": (0.7369, 0.1293)}
PAPER_RUN = "resnet20-gtsrb-badnets-br"
# Table IV: ASR (%) left after CETF on that model per population size (40: the "cetf" row's 0).
PAPER_POPULATION_ASR = {10: 0.1549, 20: 0.0321, 30: 0.0038, 40: 0.0}


def paper_reference(cell: dict) -> dict | None:
    """Tables II / III's number for a measured cell of the paper's setting, or None."""
    if cell["run"] != PAPER_RUN or cell["method"] not in PAPER:
        return None
    acc, asr = PAPER[cell["method"]]
    return {"acc": acc, "asr": asr, "acc_before": PAPER_BEFORE[0], "dataset": "gtsrb", "model": "resnet20",
            "source": "CETF paper, Tables II / III (GTSRB ResNet-20 BadNets)"}


def resumable_screen(run, images, auxiliary, filter_images, key, config, path: Path, chunk: int) -> cetf.Screening:
    """``cetf.screen`` of ``images`` in chunks of ``chunk`` (chunk i with ``fold_in(key, i)``), each
    finished chunk appended to ``path`` (npz, written atomically), so that a rerun skips them (with
    the same ``chunk``: the keys of the remaining chunks follow from it)."""
    fields = [f.name for f in dataclasses.fields(cetf.Screening)]
    done: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as stored:
            done = {name: stored[name] for name in fields}
    while len(done.get("poisoned", ())) < len(images):
        start = len(done.get("poisoned", ()))
        found = cetf.screen(run.module, run.variables, images[start:start + chunk], auxiliary, filter_images,
                            jax.random.fold_in(key, start // chunk), config)
        done = {name: np.concatenate([done[name], getattr(found, name)]) if done else getattr(found, name)
                for name in fields}
        buffer = io.BytesIO()
        np.savez(buffer, **done)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(path, buffer.getvalue())
        print(f"    CETF screened {len(done['poisoned'])} / {len(images)}", flush=True)
    return cetf.Screening(**{name: done[name][:len(images)] for name in fields})


def patch_pixels(run) -> np.ndarray | None:
    """bool[H, W]: the pixels a patch attack writes (an attack with a ``mask`` on under half of the
    image); None for the other attacks."""
    mask = getattr(run.attack, "mask", None)
    if mask is None or not 0 < float(np.mean(np.asarray(mask) > 0)) < 0.5:
        return None
    return np.asarray(mask)[..., 0] > 0


def trigger_coverage(run, triggered, layer: str, threshold: float) -> dict:
    """Where Februus' Grad-CAM sits against a patch trigger (attacks with a ``mask``; {} for the others):
    the mean normalised map value on the trigger pixels, the share of inputs whose trigger pixels all
    reach ``threshold`` (removed whole), and the median distance (pixels) from the map's peak to the
    trigger's centre."""
    on_trigger = patch_pixels(run)
    if on_trigger is None:
        return {}
    maps, _ = jax.device_get(gradcam.grad_cam(run.module, run.variables, to_float(triggered), tuple(layer.split("/"))))
    values = maps[:, on_trigger]
    peaks = np.stack(np.unravel_index(maps.reshape(len(maps), -1).argmax(axis=1), maps.shape[1:]), axis=1)
    centre = np.argwhere(on_trigger).mean(axis=0)
    return {"cam_on_trigger_mean": float(values.mean()),
            "trigger_removed_share": float((values >= threshold).all(1).mean()),
            "cam_peak_to_trigger_px": float(np.median(np.linalg.norm(peaks - centre, axis=1)))}


def training_split_inpainter(dataset: str, count: int, data_dir) -> str:
    """Februus' generator trained once (library defaults, key 0) on ``count`` clean images of the
    training split drawn stratified with key 0; kept under ``SCREENS`` (not committed: the same
    command remakes it). An ablation: CETF's defender holds 2 test images per class, on which the
    method's own generator is trained."""
    path = SCREENS / f"februus-inpainter-{dataset}-train{count}.npz"
    if not path.is_file():
        images = stratified_subset(load(dataset, "train", data_dir), count, jax.random.key(0))
        SCREENS.mkdir(parents=True, exist_ok=True)
        config = februus.resolved(februus.FebruusConfig(inpainter_out=str(path)), dataset)
        _, _, info = februus.defender_inpainter(images, jax.random.key(0), config)  # trains and saves
        print(f"Februus generator on {count} training images: L1 {info['inpainter_loss_first']:.3f} -> "
              f"{info['inpainter_loss_last']:.3f}, saved to {path}", flush=True)
    return str(path)


def measure_seed(run, name: str, seed: int, record: tables.CellRecord, args, februus_overrides=None):
    """Every missing cell of (``name``, ``seed``); ``februus_overrides``: Februus' config changes."""
    wanted = {"none", *args.methods}  # the undefended row is free and every DER needs it
    todo = [m for m in METHODS if m in wanted and record.find(run=name, k=PER_CLASS, seed=seed, method=m) is None]
    if not todo:
        return
    clean, sets = split_for_defense(run, PER_CLASS, seed, args.data_dir)
    triggered = sets.triggered.images[spread(np.arange(len(sets.triggered)), args.inputs)]
    chosen = spread(np.arange(len(sets.clean)), args.inputs)
    clean_inputs, labels = sets.clean.images[chosen], sets.clean.labels[chosen]
    inputs = np.concatenate([triggered, clean_inputs])
    n, target = len(triggered), run.target.target
    base = dict(run=name, attack=run.record["spec"]["attack"], dataset=run.dataset, model=run.record["model"],
                k=PER_CLASS, seed=seed, defense_size=len(clean), eval_size=len(clean_inputs), triggered_size=n)
    key = jax.random.key(seed)

    def add(method, predicted, flagged, seconds, info):
        row = filter_scores(flagged[:n], flagged[n:], predicted[:n], predicted[n:], target, labels, seconds)
        before = record.find(run=name, k=PER_CLASS, seed=seed, method="none")
        der = None if before is None else defense_effectiveness_rating(before["acc"], before["asr"],
                                                                       row["acc"], row["asr"])
        cell = dict(base, method=method, acc=row["acc"], asr=row["asr"], tpr=row["tpr"], fpr=row["fpr"], der=der,
                    seconds=seconds, info=dict(info, per_input_s=row["per_image_s"]))
        record.add(cell)
        print(tables.line(cell) + f" TPR {100 * row['tpr']:.1f} FPR {100 * row['fpr']:.1f}", flush=True)

    def screening(population: int | None = None):
        """The paper's CETF screening of ``inputs``, shared by both CETF rows (cached on disk); with a
        ``population``, Table IV's search of the triggered inputs only with that population."""
        config = cetf.CETFConfig() if population is None else cetf.CETFConfig(population_size=population)
        images, suffix = (inputs, "") if population is None else (triggered, f"-pop{population}")
        aux_key, run_key = jax.random.split(key)
        auxiliary, filter_images = cetf.auxiliary_split(clean, aux_key, config)
        return config, resumable_screen(run, images, auxiliary, filter_images, run_key, config,
                                        SCREENS / f"{name}-seed{seed}-{n}{suffix}.npz", args.chunk)

    for method in todo:
        if method == "none":
            add("none", predict(run.module, run.variables, inputs), np.zeros(len(inputs), bool), 0.0, {})
        elif method in ("strip", "neo", "februus"):
            result, setup = tables.timed_defense(run, method, (februus_overrides or {}) if method == "februus" else {},
                                                 clean, seed)
            started = time.perf_counter()
            predicted, flagged = result.classifier(inputs)
            seconds = setup + time.perf_counter() - started
            info = dict(tables.scalars(result.info), setup_s=setup)
            if method == "februus":
                info.update(trigger_coverage(run, triggered, info["feature_layer"], info["cam_threshold"]))
            add(method, np.asarray(predicted), np.asarray(flagged), seconds, info)
        elif method == "cetf":
            started = time.perf_counter()
            _, found = screening()
            areas = found.box[:, 2] * found.box[:, 3]
            add("cetf", found.predicted, found.poisoned, time.perf_counter() - started,
                {"generations_mean": float(found.generations.mean()),
                 "median_area_triggered": float(np.median(areas[:n])),
                 "median_area_clean": float(np.median(areas[n:]))})
        elif method.startswith("cetf-pop"):
            # Table IV: the same search with another population, on the triggered inputs only.
            population = int(method.removeprefix("cetf-pop"))
            started = time.perf_counter()
            _, found = screening(population)
            seconds = time.perf_counter() - started
            left = ~found.poisoned & (found.predicted == target)
            cell = dict(base, method=method, acc=None, asr=float(left.mean()), tpr=float(found.poisoned.mean()),
                        fpr=None, der=None, seconds=seconds,
                        info={"population": population, "generations_mean": float(found.generations.mean()),
                              "per_input_s": seconds / n})
            record.add(cell)
            print(f"  {name} seed={seed} {method}: ASR left {100 * cell['asr']:.2f} TPR {100 * cell['tpr']:.1f} "
                  f"({seconds:.0f} s)", flush=True)
        elif method == "cetf-region-limit":
            # The screening of "cetf" (cached), judged with a region limit from the defender's clean set.
            config, found = screening()
            started = time.perf_counter()
            calibrating = dataclasses.replace(config, calibration_size=args.calibration_size)
            limited, calibration = cetf.calibrate_max_region(run.module, run.variables, clean, key, calibrating)
            flagged = found.poisoned & cetf.within_limit(found.box, limited.max_region, inputs.shape)
            cetf_cell = record.find(run=name, k=PER_CLASS, seed=seed, method="cetf")
            add("cetf-region-limit", found.predicted, flagged,
                time.perf_counter() - started + (cetf_cell["seconds"] if cetf_cell else 0.0),
                {k: v for k, v in calibration.items() if k != "calibration_areas"})


def markdown(record: tables.CellRecord, command: str) -> str:
    rows = []
    for (name, method), cells in sorted(tables.group(record.cells, ("run", "method")).items(), key=lambda item: (
            RUNS.index(item[0][0]) if item[0][0] in RUNS else len(RUNS), METHODS.index(item[0][1]))):
        paper = paper_reference(cells[0])
        ref = "–" if paper is None else f"{100 * paper['acc']:.2f} / {100 * paper['asr']:.2f}"
        if method == "none" and name == PAPER_RUN:
            ref = f"{100 * PAPER_BEFORE[0]:.2f} / {100 * PAPER_BEFORE[1]:.2f}"
        if method.startswith("cetf-pop") and name == PAPER_RUN:
            ref = f"– / {100 * PAPER_POPULATION_ASR[cells[0]['info']['population']]:.2f} (t. IV)"
        rows.append(
            f"| {name} | {method} | {tables.mean_std([c['acc'] for c in cells])} | "
            f"{tables.mean_std([c['asr'] for c in cells], count=all(c['acc'] is None for c in cells))} | "
            f"{tables.mean_std([c['tpr'] for c in cells], count=False)} | "
            f"{tables.mean_std([c['fpr'] for c in cells], count=False)} | "
            f"{tables.mean_std([c['der'] for c in cells], count=False)} | "
            f"{np.mean([c['info'].get('per_input_s', 0.0) for c in cells]):.2f} | {ref} |")
    settings = record.settings
    return "\n".join([
        "# Input filters on zoo v2 (CETF Tables II / III): CETF, STRIP, NEO, Februus",
        "",
        f"Generated by `{command}` from `{record.path.name}` (one cell per model, method and seed; "
        "every number measured here). Per seed: the defender's clean set is "
        f"{PER_CLASS} test images per class (the CETF paper's setting, drawn by the seed); the inputs are "
        f"{settings['inputs']} triggered test images (non-target classes) and {settings['inputs']} clean ones, "
        "spread over the rest of the test split. ACC = clean inputs accepted and right, ASR = triggered inputs "
        "accepted and sent to the target (rejections count as failures, the paper's convention); TPR / FPR = "
        "triggered / clean inputs rejected (Februus purifies and rejects nothing); DER from the undefended "
        "model on the same inputs. `cetf-region-limit` is ours, not the paper's method (an ablation): the "
        "same screening, with regions larger than a limit set on "
        f"{settings['calibration_size']} of the defender's clean images taken as clean "
        "(`bdjax.defenses.cetf.calibrate_max_region`). Paper: Tables II / III, GTSRB ResNet-20 under its "
        "BadNets (our `resnet20-gtsrb-badnets-br`). `cetf-popP`: Table IV, the paper's search and rule with a "
        "population of P (the `cetf` row has the default 40) on the triggered inputs only; its ASR is the "
        "paper's \"ASR after CETF\" (triggered inputs not flagged that the model sends to the target), so ACC, "
        "FPR and DER are not measured there (its seed count n is on the ASR column). Seconds per input on the "
        "machine that ran it (a shared 2-core CPU for the committed record).",
        *([] if "februus_train_images" not in settings else [
            "", f"**Ablation, not the method as CETF's defender runs it:** Februus' generator here is trained once "
            f"on {settings['februus_train_images']} clean images of the training split "
            "(`filter_tables.training_split_inpainter`), not on the defender's 2 images per class."]),
        "",
        "| model | method | ACC % | ASR % | TPR % | FPR % | DER % | s / input | paper ACC / ASR % |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "", *februus_notes(record)])


def februus_coverage(cells: list[dict]) -> dict[str, dict]:
    """Per model, its Februus cells that carry ``trigger_coverage`` ("cells") with their Grad-CAM
    layer and threshold and the mean over seeds of each coverage number."""
    cells = [c for c in cells if c["method"] == "februus" and "cam_on_trigger_mean" in c["info"]]
    out = {}
    for (name,), group in tables.group(cells, ("run",)).items():
        info = [c["info"] for c in group]
        out[name] = {"cells": group, "feature_layer": info[0]["feature_layer"],
                     "cam_threshold": info[0]["cam_threshold"],
                     **{key: float(np.mean([i[key] for i in info]))
                        for key in ("cam_on_trigger_mean", "trigger_removed_share", "cam_peak_to_trigger_px")}}
    return out


def februus_notes(record: tables.CellRecord) -> list[str]:
    """Where Februus' Grad-CAM sat against a patch trigger, per model (``trigger_coverage``)."""
    lines = []
    for name, found in februus_coverage(record.cells).items():
        seeds = len(found["cells"])
        lines += [
            f"Februus on {name} ({seeds} seed{'s' if seeds > 1 else ''}): Grad-CAM layer "
            f"`{found['feature_layer']}`, threshold {found['cam_threshold']}; on the triggered inputs the "
            f"normalised map is {found['cam_on_trigger_mean']:.2f} on the trigger's pixels "
            f"(mean), the whole trigger reaches the threshold on "
            f"{100 * found['trigger_removed_share']:.1f}% of them, and the map's peak lies "
            f"{found['cam_peak_to_trigger_px']:.1f} px from the trigger's centre (median).", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=list(RUNS), help="zoo v2 run names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="which filters to measure (CETF screens for hours on a CPU; the others take minutes)")
    parser.add_argument("--inputs", type=int, default=200, help="triggered and clean inputs each, per seed")
    parser.add_argument("--calibration-size", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=20, help="CETF inputs screened between saves")
    parser.add_argument("--record", default=RECORD, help="results/NAME.{json,md}")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--februus-train-images", type=int, default=None,
                        help="an ablation: Februus' generator trained on this many clean images of the training "
                             "split instead of the defender's clean set (use its own --record)")
    args = parser.parse_args(argv)
    settings = {"inputs": args.inputs, "calibration_size": args.calibration_size, "per_class": PER_CLASS}
    if args.februus_train_images is not None:
        if args.record == RECORD:
            parser.error("--februus-train-images is an ablation: write it to its own --record")
        settings["februus_train_images"] = args.februus_train_images
    record = tables.CellRecord(tables.RESULTS / f"{args.record}.json", settings)
    command = "python experiments/filter_tables.py" + ("" if args.record == RECORD else f" --record {args.record}")
    if args.februus_train_images is not None:
        command += f" --februus-train-images {args.februus_train_images}"
    out = tables.RESULTS / f"{args.record}.md"
    for name in [] if args.table_only else args.only:
        run = tables.zoo_run("v2", name)
        overrides = None
        if args.februus_train_images is not None and "februus" in args.methods:
            overrides = {"inpainter_file": training_split_inpainter(run.dataset, args.februus_train_images,
                                                                    args.data_dir)}
        for seed in args.seeds:
            measure_seed(run, name, seed, record, args, overrides)
            out.write_text(markdown(record, command))
    out.write_text(markdown(record, command))
    print(f"wrote {out.with_suffix('')}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
