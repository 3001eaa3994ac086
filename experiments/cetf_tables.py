"""CETF, STRIP and NEO as input filters, and CETF's BN repairs, on the zoo's GTSRB BadNets models.

    python experiments/cetf_tables.py                                   # medium-bn, 30 + 30 inputs
    python experiments/cetf_tables.py --only resnet20-gtsrb-badnets --inputs 10 --suspects 2

Per model (defender's clean set: 2 test images per class, the paper's setting; the rest of the
test split is the evaluation set):

1. detection: CETF (the paper's search: population 40, <= 100 generations, patience 10), STRIP
   (0.5/0.5 blend and the authors' saturated sum, thresholds at 1% and 15% clean FPR) and NEO on
   the same ``--inputs`` successfully triggered + ``--inputs`` clean evaluation images, spread
   evenly over the classes: TPR / FPR, and ACC / ASR on those inputs with rejected inputs
   counted as failures (the paper's Tables II / III convention); ``--calibration-size`` adds our
   ablation "CETF, region limit from N clean" (the same search; regions larger than a limit set
   on the defender's clean images count as clean, ``cetf.calibrate_max_region``); ``--triggers 1 2 3`` repeats it
   with 2 and 3 triggers pasted per input (the paper's multi-trigger robustness, Table VI);
   ``--februus`` adds Februus (input purification: it rejects nothing, so TPR = FPR = 0 and
   ACC / ASR are those of the purified inputs), its generator trained on the defender's clean
   set (``--februus-steps``) or loaded from ``--februus-inpainter``;
2. repairs: ``cetf+bn-clean``, ``cetf+bn-unlearn``, ``cetf+unlearn`` through ``defend_run`` with
   k = 2 clean images per class; their triggers come from CETF screening ``--suspects`` triggered
   + ``--suspects`` clean evaluation inputs (a ``suspect_file``), ACC / ASR on the evaluation set;
3. per-class (the paper's Fig. 9): each repair with k = 1..4 triggered clean images per class
   (defender's set: 4 per class), with the triggers CETF extracts from the same suspects
   (screened once) and with the attack's own trigger (the paper's Tables VII / VIII setting;
   on a patch attack, what a perfect extraction would give, which separates the repair from
   the search);
4. populations (the paper's Table IV): ASR left after CETF (a successful poisoned input that
   CETF does not flag) for population sizes ``--populations`` on ``--population-inputs``
   triggered inputs, with clean-input FPR on as many clean ones;
5. timing: one image's DE search with the population vmapped (one compiled program) against a
   Python loop over the individuals (jitted fitness per individual), same generations.

Everything is timed on whatever machine runs it (a shared 2-core CPU for the committed results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import checkpoint
from bdjax.data.dataset import to_float
from bdjax.defenses import bn_repair, cetf, februus, neo, strip
from bdjax.evaluation import evaluate_model
from bdjax.models.inference import predict
from bdjax.runs import defend_run, split_for_defense

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
ZOO_V2_DIR = Path(__file__).resolve().parent / "zoo-v2"


def spread(indices: np.ndarray, count: int) -> np.ndarray:
    """``count`` entries of ``indices`` evenly spaced (the sets are sorted by class)."""
    return indices[np.linspace(0, len(indices) - 1, min(count, len(indices))).round().astype(int)]


def filter_scores(flag_triggered, flag_clean, pred_triggered, pred_clean, target, clean_labels, seconds) -> dict:
    """TPR / FPR and the paper's ACC / ASR after filtering (rejected = failed) on the inputs."""
    return {"tpr": float(np.mean(flag_triggered)), "fpr": float(np.mean(flag_clean)),
            "acc": float(np.mean((pred_clean == clean_labels) & ~flag_clean)),
            "asr": float(np.mean((pred_triggered == target) & ~flag_triggered)),
            "seconds": seconds, "per_image_s": seconds / (len(flag_triggered) + len(flag_clean))}


def februus_row(run, clean, inputs, n, clean_labels, key, config: februus.FebruusConfig) -> dict:
    """Februus on the same inputs: ACC / ASR of the purified inputs (nothing is rejected)."""
    started = time.perf_counter()
    result = februus.februus(run.module, run.variables, clean, key, config)
    inpainter_s = time.perf_counter() - started
    started = time.perf_counter()
    config = februus.resolved(config, clean.info.name)  # the threshold februus() used
    found = februus.purify(run.module, run.variables, result.info["inpainter"], inputs, config)
    never = np.zeros(len(inputs), bool)
    row = filter_scores(never[:n], never[n:], found.predicted[:n], found.predicted[n:], run.target.target,
                        clean_labels, time.perf_counter() - started)
    row.update(inpainter_s=inpainter_s, cam_threshold=config.cam_threshold,
               removed_triggered=float(found.removed[:n].mean()), removed_clean=float(found.removed[n:].mean()),
               **{k: v for k, v in result.info.items() if k.startswith("inpainter_")})
    return row


def detection(run, clean, triggered, clean_inputs, clean_labels, key,
              februus_config: februus.FebruusConfig | None = None, calibration_size: int = 0) -> dict:
    target = run.target.target
    inputs = np.concatenate([triggered, clean_inputs])
    n = len(triggered)
    rows = {}

    # CETF: warm up (compile) on one batch, then screen every input.
    config = cetf.CETFConfig()
    aux_key, run_key = jax.random.split(key)
    auxiliary, filter_images = cetf.auxiliary_split(clean, aux_key, config)
    started = time.perf_counter()
    cetf.screen(run.module, run.variables, inputs[:config.batch_size], auxiliary, filter_images, run_key, config)
    compile_and_batch = time.perf_counter() - started
    started = time.perf_counter()
    found = cetf.screen(run.module, run.variables, inputs, auxiliary, filter_images, run_key, config)
    seconds = time.perf_counter() - started
    rows["CETF"] = filter_scores(found.poisoned[:n], found.poisoned[n:], found.predicted[:n], found.predicted[n:],
                                 target, clean_labels, seconds)
    rows["CETF"].update(first_batch_with_compile_s=compile_and_batch,
                        generations_mean=float(found.generations.mean()),
                        trigger_boxes=found.box[:n][found.poisoned[:n]].tolist(),
                        false_positive_boxes=found.box[n:][found.poisoned[n:]].tolist())
    print("CETF", {k: v for k, v in rows["CETF"].items() if "boxes" not in k}, flush=True)
    if calibration_size:
        # Our ablation, not the paper's rule: the same search, regions above a limit set on the
        # defender's clean images count as clean (cetf.calibrate_max_region, the same key's split).
        started = time.perf_counter()
        limited, calibration = cetf.calibrate_max_region(run.module, run.variables, clean, key,
                                                         dataclasses.replace(config, calibration_size=calibration_size))
        flagged = found.poisoned & cetf.within_limit(found.box, limited.max_region, inputs.shape)
        name = f"CETF, region limit from {calibration_size} clean (ours)"
        rows[name] = filter_scores(flagged[:n], flagged[n:], found.predicted[:n], found.predicted[n:], target,
                                   clean_labels, seconds)
        rows[name].update(calibration_s=time.perf_counter() - started, **calibration)
        print(name, {k: v for k, v in rows[name].items() if k != "calibration_areas"}, flush=True)

    for weight in (0.5, 1.0):
        for rate in (0.01, 0.15):
            config = strip.STRIPConfig(input_weight=weight, overlay_weight=weight, false_positive_rate=rate)
            started = time.perf_counter()
            result = strip.strip(run.module, run.variables, clean, key, config)
            predicted, flagged = result.classifier(inputs)
            name = f"STRIP {'0.5x+0.5c' if weight == 0.5 else 'clip(x+c)'} @{rate:.0%} FPR"
            rows[name] = filter_scores(flagged[:n], flagged[n:], predicted[:n], predicted[n:], target,
                                       clean_labels, time.perf_counter() - started)
            rows[name]["threshold_bits"] = result.info["threshold"]
            print(name, rows[name], flush=True)

    started = time.perf_counter()
    result = neo.neo(run.module, run.variables, clean, key, neo.NEOConfig())
    predicted, flagged = result.classifier(inputs)
    rows["NEO"] = filter_scores(flagged[:n], flagged[n:], predicted[:n], predicted[n:], target, clean_labels,
                                time.perf_counter() - started)
    print("NEO", rows["NEO"], flush=True)

    if februus_config is not None:
        rows["Februus"] = februus_row(run, clean, inputs, n, clean_labels, key, februus_config)
        print("Februus", rows["Februus"], flush=True)
    return rows


def multi_triggered(run, sets, count: int, inputs: int, seed: int) -> np.ndarray:
    """The paper's multi-trigger inputs: ``count`` triggers pasted on each evaluation image (a
    stochastic attack draws a new spot and size each time; a fixed patch would land on itself),
    keeping ``inputs`` of those the model sends to the target, spread over the classes."""
    if count < 1:
        raise ValueError(f"triggers per input must be >= 1, got {count}")
    images = sets.triggered.images  # already carries one trigger
    for extra in range(1, count):
        images = run.attack.apply_uint8(images, jax.random.fold_in(jax.random.key(seed), 1000 + extra))
    hits = np.flatnonzero(predict(run.module, run.variables, images) == run.target.target)
    return images[spread(hits, inputs)]


def repairs(run, suspects, data_dir, seed) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "suspects.npy")
        np.save(path, suspects)
        for method in ("cetf+bn-clean", "cetf+bn-unlearn", "cetf+unlearn"):
            outcome = defend_run(run, method, clean_per_class=2, seed=seed, overrides={"suspect_file": path},
                                 data_dir=data_dir)
            info = outcome.result.info
            rows[method] = {"before": outcome.before.to_dict(), "after": outcome.after.to_dict(),
                            "seconds": outcome.seconds, "flagged": info.get("flagged"),
                            "screened": info.get("screened"), "repair_size": info.get("repair_size"),
                            "warning": info.get("warning"), "regions": info.get("regions")}
            print(method, rows[method], flush=True)
    return rows


def populations(run, clean, triggered, clean_inputs, key, sizes) -> dict:
    """Table IV: TPR (= 1 − ASR left on successful poisoned inputs) and FPR per population size."""
    aux_key, run_key = jax.random.split(key)
    rows = {}
    for size in sizes:
        config = cetf.CETFConfig(population_size=size)
        auxiliary, filter_images = cetf.auxiliary_split(clean, aux_key, config)
        started = time.perf_counter()
        found = cetf.screen(run.module, run.variables, np.concatenate([triggered, clean_inputs]), auxiliary,
                            filter_images, run_key, config)
        n = len(triggered)
        rows[str(size)] = {"asr_left": float(1 - found.poisoned[:n].mean()), "fpr": float(found.poisoned[n:].mean()),
                           "inputs": n, "seconds": time.perf_counter() - started,
                           "generations_mean": float(found.generations.mean())}
        print(f"population {size}:", rows[str(size)], flush=True)
    return rows


class AttackPaste:
    """The attack's own trigger in the place of an extracted one (``paste`` as ``cetf.Trigger``):
    the paper's Tables VII / VIII setting ("poisoned samples for each class"), and for a patch
    attack an oracle of what a perfect extraction would give."""

    def __init__(self, attack):
        self.attack = attack

    def paste(self, images: np.ndarray) -> np.ndarray:
        return self.attack.apply_uint8(images, jax.random.key(0) if self.attack.stochastic else None)


def per_class_repairs(run, suspects, data_dir, seed, sources=("cetf", "attack"), ks=(1, 2, 3, 4)) -> dict:
    """Fig. 9: every repair with k triggered images per class, with CETF's triggers extracted
    from ``suspects`` and / or the attack's own trigger."""
    clean, sets = split_for_defense(run, max(ks), seed, data_dir)
    before = evaluate_model(run.module, run.variables, sets)
    extract_key, data_key, train_key = jax.random.split(jax.random.key(seed), 3)
    out = {"before": before.to_dict(), "defense_size": len(clean), "eval_size": len(sets.clean), "rows": []}
    triggers = {"attack": [AttackPaste(run.attack)]}
    if "cetf" in sources:
        started = time.perf_counter()
        triggers["cetf"], info = bn_repair.extract_triggers(run.module, run.variables, clean, extract_key,
                                                            bn_repair.RepairConfig(suspect_images=suspects))
        out.update(screen_seconds=time.perf_counter() - started, flagged=info["flagged"],
                   screened=info["screened"], regions=info["regions"]["box"])
        print("per-class: CETF flagged", info["flagged"], "of", info["screened"], info["regions"]["box"], flush=True)
    for source in sources:
        if not triggers[source]:
            continue
        for k in ks:
            for kind in bn_repair.REPAIRS:
                started = time.perf_counter()
                new, _ = bn_repair.repair_with_triggers(kind, run.module, run.variables, clean, triggers[source],
                                                        data_key, train_key, bn_repair.RepairConfig(per_class=k))
                seconds = time.perf_counter() - started
                after = evaluate_model(run.module, new, sets)
                out["rows"].append({"triggers": source, "k": k, "repair": kind, "seconds": seconds,
                                    "after": after.to_dict()})
                print(f"per-class {source} k={k} {kind}: ACC {after.acc:.4f} ASR {after.asr:.4f} ({seconds:.1f} s)",
                      flush=True)
    return out


def python_loop_search(logits_fn, image, label, prior, auxiliary, auxiliary_predicted, key, population, generations):
    """The DE of ``cetf.search_regions`` with a Python loop over individuals (jitted fitness each)."""
    strategy = cetf.CETFDifferentialEvolution(population, solution=jnp.zeros(4, jnp.float32))
    params = strategy.default_params
    decode = jax.jit(cetf.decode)
    fitness = jax.jit(lambda box: cetf.fitness(logits_fn, image, label, box, auxiliary, auxiliary_predicted))
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)

    def evaluate(members):
        boxes = [decode(member, prior) for member in members]
        return jnp.stack(boxes), jnp.stack([fitness(box) for box in boxes])

    init_key, key = jax.random.split(key)
    low = jnp.stack([prior[0], prior[1], 1, 1]).astype(jnp.float32)
    high = jnp.stack([prior[2], prior[3], prior[2] - prior[0] + 1, prior[3] - prior[1] + 1]).astype(jnp.float32)
    boxes, values = evaluate(jax.random.uniform(init_key, (population, 4), minval=low, maxval=high))
    state = strategy.init(init_key, boxes, -values, params)
    for _ in range(generations):
        key, ask_key, tell_key = jax.random.split(key, 3)
        offspring, state = ask(ask_key, state, params)
        boxes, values = evaluate(offspring)
        state, _ = tell(tell_key, boxes, -values, state, params)
    return jax.block_until_ready(state.best_fitness)


def de_timing(run, clean, image, key, generations: int) -> dict:
    """Seconds per generation of one image's DE: vmapped population vs a Python loop."""
    config = cetf.CETFConfig()
    auxiliary, _ = cetf.auxiliary_split(clean, key, config)
    auxiliary = jnp.asarray(to_float(auxiliary))
    image = jnp.asarray(to_float(image))

    def logits_fn(batch):
        return run.module.apply(run.variables, batch, train=False)

    label = jnp.argmax(logits_fn(image[None])[0])
    auxiliary_predicted = jnp.argmax(logits_fn(auxiliary), -1)
    prior = jnp.array([0, 0, image.shape[0], image.shape[1]], jnp.int32)  # the whole image: no CAM step

    def vectorised(count):
        search = jax.jit(lambda key: cetf.search_regions(
            logits_fn, image[None], label[None], prior[None], auxiliary, auxiliary_predicted, key,
            population_size=config.population_size, max_generations=count, patience=count + 1))
        jax.block_until_ready(search(key))  # compile
        started = time.perf_counter()
        jax.block_until_ready(search(jax.random.fold_in(key, 1)))
        return time.perf_counter() - started

    def looped(count):
        python_loop_search(logits_fn, image, label, prior, auxiliary, auxiliary_predicted, key,
                           config.population_size, 1)  # compile
        started = time.perf_counter()
        python_loop_search(logits_fn, image, label, prior, auxiliary, auxiliary_predicted,
                           jax.random.fold_in(key, 1), config.population_size, count)
        return time.perf_counter() - started

    vmap_s, loop_s = vectorised(generations), looped(generations)
    result = {"generations": generations, "population": config.population_size,
              "vmapped_s_per_generation": vmap_s / generations, "loop_s_per_generation": loop_s / generations,
              "speedup": loop_s / vmap_s}
    print("DE timing", result, flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--only", nargs="*", default=["medium-bn-gtsrb-badnets"], help="zoo run names")
    parser.add_argument("--inputs", type=int, default=30, help="triggered and clean inputs each (detection)")
    parser.add_argument("--suspects", type=int, default=4, help="triggered and clean inputs each (repairs)")
    parser.add_argument("--timing-generations", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["detection", "repairs", "per-class", "populations", "timing"])
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--population-inputs", type=int, default=10, help="triggered and clean inputs each")
    parser.add_argument("--trigger-sources", nargs="+", default=["cetf", "attack"], choices=["cetf", "attack"],
                        help="per-class repairs: CETF's extracted triggers and / or the attack's own")
    parser.add_argument("--triggers", type=int, nargs="+", default=[1],
                        help="detection: triggers pasted per input (the paper's multi-trigger setting: 2, 3)")
    parser.add_argument("--zoo", choices=["v1", "v2"], default="v1",
                        help="which zoo's models (v1: experiments/zoo, v2: experiments/zoo-v2)")
    parser.add_argument("--februus", action="store_true", help="detection: add Februus (input purification)")
    parser.add_argument("--februus-steps", type=int, default=februus.InpainterConfig.steps,
                        help="Februus: inpainter training steps on the defender's clean set")
    parser.add_argument("--februus-inpainter", default=None,
                        help="Februus: a generator saved by februus.save_inpainter instead of training one")
    parser.add_argument("--calibration-size", type=int, default=10,
                        help="detection: add CETF with its region limit calibrated on this many of the defender's "
                             "clean images (an ablation of ours; 0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cetf_tables.json"))
    args = parser.parse_args(argv)

    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for name in args.only:
        run = checkpoint.load((ZOO_DIR if args.zoo == "v1" else ZOO_V2_DIR) / name)
        clean, sets = split_for_defense(run, 2, args.seed, args.data_dir)
        before = evaluate_model(run.module, run.variables, sets)
        hits = np.flatnonzero(predict(run.module, run.variables, sets.triggered.images) == run.target.target)
        chosen = spread(np.arange(len(sets.clean)), args.inputs)
        triggered, clean_inputs = sets.triggered.images[spread(hits, args.inputs)], sets.clean.images[chosen]
        entry = results.setdefault(name, {})
        entry.update(before=before.to_dict(), defense_size=len(clean), eval_size=len(sets.clean),
                     inputs=len(triggered), backend=jax.default_backend())
        print(name, entry, flush=True)
        key = jax.random.key(args.seed)
        februus_config = None
        if args.februus:
            februus_config = februus.FebruusConfig(
                inpainter=februus.InpainterConfig(steps=args.februus_steps), inpainter_file=args.februus_inpainter)
        if "detection" not in args.skip:
            for count in args.triggers:
                inputs = triggered if count == 1 else multi_triggered(run, sets, count, args.inputs, args.seed)
                label = "detection" if count == 1 else f"detection_{count}_triggers"
                entry[label] = detection(run, clean, inputs, clean_inputs, sets.clean.labels[chosen], key,
                                         februus_config, args.calibration_size)
                entry[label]["triggered_inputs"] = len(inputs)
        if "repairs" not in args.skip:
            suspects = np.concatenate([triggered[:args.suspects], clean_inputs[:args.suspects]])
            entry["repairs"] = repairs(run, suspects, args.data_dir, args.seed)
            entry["suspects"] = len(suspects)
        if "per-class" not in args.skip:
            suspects = np.concatenate([triggered[:args.suspects], clean_inputs[:args.suspects]])
            entry["per_class"] = per_class_repairs(run, suspects, args.data_dir, args.seed, args.trigger_sources)
            Path(args.out).write_text(json.dumps(results, indent=1))
        if "populations" not in args.skip:
            pick = spread(np.arange(len(triggered)), args.population_inputs)  # still spread over the classes
            entry["populations"] = populations(run, clean, triggered[pick], clean_inputs[pick], key, args.populations)
            Path(args.out).write_text(json.dumps(results, indent=1))
        if "timing" not in args.skip:
            entry["de_timing"] = de_timing(run, clean, triggered[0], key, args.timing_generations)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
