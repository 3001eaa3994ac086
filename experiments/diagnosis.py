"""Issue 31 item 5: for each method that stays below its paper on zoo v2, what the stored records
say about "implementation" against "setting", and which experiment is still missing.

Every number below is read from a record in ``results/``; nothing is typed in. The results book
(``results_book.py``) puts :func:`section` after its summary. A paragraph whose records are
absent says which command writes them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import tables  # experiments/tables.py (this folder is on sys.path for its scripts)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ZOO_V2 = HERE / "zoo-v2"


def _record(record: str) -> dict:
    """results/``record``.json ({"settings", "cells"}; empty when the record is missing)."""
    path = RESULTS / f"{record}.json"
    return json.loads(path.read_text()) if path.is_file() else {"settings": {}, "cells": []}


def _cells(record: str) -> list[dict]:
    return _record(record)["cells"]


def _pick(cells, run, method, k=15):
    return sorted((c for c in cells if c["run"] == run and c["method"] == method and c["k"] == k),
                  key=lambda c: c["seed"])


def _acc_costs(defended: list[dict], cells: list[dict]) -> list[float]:
    """ACC each defended cell lost against the undefended cell of its run, k and seed in ``cells``."""
    key = lambda c: (c["run"], c["k"], c["seed"])  # noqa: E731
    before = {key(c): c["acc"] for c in cells if c["method"] == "none"}
    return [before[key(c)] - c["acc"] for c in defended if key(c) in before]


def _steps(clean_size: int, epochs: int) -> int:
    from bdjax.defenses.finetune import FinetuneConfig

    return math.ceil(clean_size / FinetuneConfig.batch_size) * epochs


def fine_tuning() -> str:
    run = "resnet20-gtsrb-badnets"
    ft, longer = _pick(_cells("tsbd_tables"), run, "ft"), _pick(_cells("tsbd_ablation"), run, "ft-cifar-steps")
    if not ft or not longer:
        return ("**FT on GTSRB BadNets.** Records missing: `python experiments/tsbd_tables.py` and "
                "`python experiments/tsbd_tables.py --methods ft-cifar-steps --only resnet20-gtsrb-badnets "
                "--record tsbd_ablation`.")
    from bdjax.defenses.finetune import FinetuneConfig

    size = ft[0]["defense_size"]
    return (f"**FT on GTSRB BadNets (ASR {tables.mean_std(digits=1, values=[c['asr'] for c in ft])}; the slides' CIFAR-10 row: 1.5).** "
            f"FT's {FinetuneConfig.epochs} epochs on {size} clean images are about {_steps(size, FinetuneConfig.epochs)} "
            f"SGD steps; BackdoorBench's 20 epochs on CIFAR-10's 5% (2,500 images) are about 780. With 80 epochs "
            f"({_steps(size, 80)} steps) ASR is {tables.mean_std(digits=1, values=[c['asr'] for c in longer])}: the step count explains part "
            "of the gap, not most of it. TSBD removes the backdoor with the same clean sets, so the clean "
            "data is enough for some method." + _fine_tuning_cifar())


def _fine_tuning_cifar() -> str:
    """FT on the CIFAR-10 BadNets model of the same table: dataset against method."""
    cells = _cells("tsbd_tables")
    run = "resnet20-cifar10-badnets"
    ft = [c for c in cells if c["run"] == run and c["method"] == "ft"]
    # The table's smallest clean set (1% of the training split); the 5% cells are the comparison below.
    ft = [c for c in ft if c["defense_size"] == min(c["defense_size"] for c in ft)]
    if not ft:
        return (" Not yet separated (the slides' FT row is CIFAR-10 PreAct-ResNet-18 only): FT on zoo v2's "
                f"CIFAR-10 ResNet-20 (`python experiments/tsbd_tables.py --only {run}`), which tells dataset from method.")
    cost = _acc_costs(ft, cells)
    from bdjax.defenses.finetune import FinetuneConfig

    size = ft[0]["defense_size"]
    text = (f" On CIFAR-10 too (zoo v2's ResNet-20 BadNets, {size} clean images = "
            f"{100 * size / 50000:.0f}% of the training split's size, about {_steps(size, FinetuneConfig.epochs)} steps) "
            f"FT leaves ASR {tables.mean_std(digits=1, values=[c['asr'] for c in ft])} at "
            f"{tables.mean_std(cost, digits=1, count=False)} ACC points: the dataset is not what separates "
            "us from the slides.")
    ablation = _cells("tsbd_ablation")
    larger = [c for c in ablation if c["run"] == run and c["method"] == "ft" and c["defense_size"] > size]
    if not larger:
        return text + (" Not yet run: FT with the slides' 5% (`python experiments/tsbd_tables.py --only "
                       f"{run} --clean-per-class 250 --methods ft --record tsbd_ablation`).")
    cost = _acc_costs(larger, ablation)
    asr = [c["asr"] for c in larger]
    big = larger[0]["defense_size"]
    text += (f" With the slides' clean-set size ({big} images, about {_steps(big, FinetuneConfig.epochs)} steps; "
             f"`tsbd_ablation`): ASR {tables.mean_std(asr, digits=1)} at {tables.mean_std(cost, digits=1, count=False)} "
             "ACC points")
    if np.mean(asr) < 0.2:
        return text + ": the clean set's size is the difference."
    return text + (": five times the data does not do it either, so what is left is the model (the slides' "
                   "PreAct-ResNet-18 at 93% ACC) or a schedule the slides do not give.")


def tsbd_blended() -> str:
    cells = _cells("tsbd_tables")
    parts = []
    for run in ("resnet20-gtsrb-badnets", "resnet20-gtsrb-blended", "resnet20-gtsrb-lf", "resnet20-gtsrb-ssba"):
        stage1, final = _pick(cells, run, "tsbd-stage1"), _pick(cells, run, "tsbd")
        seeds = sorted({c["seed"] for c in stage1} & {c["seed"] for c in final})
        if not seeds:
            continue
        stages = list(zip(*(([c for c in group if c["seed"] in seeds]) for group in (stage1, final))))
        pairs = ", ".join(f"{100 * s['asr']:.1f} → {100 * f['asr']:.1f}" for s, f in stages)
        fractions = sorted({c["info"].get("fraction") for c in final if c["seed"] in seeds})
        raised = sum(f["asr"] > s["asr"] for s, f in stages)
        parts.append(f"{run.split('-')[-1]} (seeds {', '.join(map(str, seeds))}): ASR after stage 1 → after "
                     f"stage 2 {pairs}, n = {', '.join(f'{100 * f:.0f}%' for f in fractions)}; stage 2 "
                     f"raises the ASR on {raised} of {len(seeds)} seeds")
    if not parts:
        return "**TSBD's two stages on GTSRB.** Record missing: `python experiments/tsbd_tables.py`."
    return ("**TSBD's two stages on GTSRB (the slides' CIFAR-10 rows: ASR 1.3-2.6 on these attacks).** "
            + "; ".join(parts) + ". On BadNets stage 2's fine-tuning removes what stage 1 leaves; on the other "
            "attacks it does not, and where stage 1 removed the backdoor it brings part of it back. "
            + tsbd_ablation(cells))


ABLATIONS = {"tsbd-plain-ft": "stage 1 + plain fine-tuning (no penalty)", "tsbd-n20": "n fixed at 20%",
             "tsbd-n40": "n fixed at 40%"}


def tsbd_ablation(cells: list[dict]) -> str:
    """What the stage ablations on resnet20-gtsrb-blended say (their seeds against TSBD's own)."""
    run = "resnet20-gtsrb-blended"
    ablation = [c for c in _cells("tsbd_ablation") if c["run"] == run and c["method"] in ABLATIONS]
    if not ablation:
        return ("Hypothesis, not yet tested: too few neurons are reinitialised (the n picked on clean "
                "validation data is small), rather than a wrong penalty. Not yet run, the experiment that "
                "separates the stages: `python experiments/tsbd_tables.py --only resnet20-gtsrb-blended --methods "
                "tsbd-plain-ft tsbd-n20 tsbd-n40 --seeds 0 --record tsbd_ablation` (stage 1 + plain fine-tuning; n "
                "fixed above what the clean validation part picks).")
    seeds = sorted({c["seed"] for c in ablation})
    own = [c for c in _pick(cells, run, "tsbd") if c["seed"] in seeds]
    base = np.mean([c["asr"] for c in own]) if own else None
    found = {m: np.mean([c["asr"] for c in ablation if c["method"] == m]) for m in ABLATIONS
             if any(c["method"] == m for c in ablation)}
    text = (f"Stage ablation on {run} (seeds {', '.join(map(str, seeds))}; ASR after stage 2): TSBD as run "
            f"{'–' if base is None else f'{100 * base:.1f}'}; "
            + "; ".join(f"{ABLATIONS[m]} {100 * asr:.1f}" for m, asr in found.items()) + ".")
    if base is None:
        return text
    more = [found[m] for m in ("tsbd-n20", "tsbd-n40") if m in found]
    if more and min(more) < base - 0.2:
        text += (" Reinitialising more neurons lowers the final ASR by 20 points or more: the n that the clean "
                 "validation part picks is too small on this model (choosing n without test data stays open).")
    elif more:
        text += " Reinitialising more neurons does not lower the final ASR by 20 points: n is not the cause."
    if "tsbd-plain-ft" in found:
        change = found["tsbd-plain-ft"] - base
        text += (f" Without the gradient-norm penalty the final ASR is {abs(100 * change):.1f} points "
                 f"{'higher' if change > 0 else 'lower'}: the penalty "
                 f"{'holds part of the backdoor back' if change > 0.2 else 'is not what brings it back' if change > -0.2 else 'brings part of it back'}.")
    return text


def rnp() -> str:
    cells = [c for c in _cells("tsbd_tables") if c["method"] == "rnp"]
    if not cells:
        return "**RNP.** Record missing: `python experiments/tsbd_tables.py`."
    from bdjax import checkpoint, surgery
    from bdjax.defenses.rnp import RnpConfig

    run = checkpoint.load(ZOO_V2 / "resnet20-gtsrb-badnets")
    neurons = sum(int(surgery.get_path(run.variables["params"], u.bn)["scale"].shape[-1])
                  for u in surgery.bn_units(run.module))
    counts = [c["info"]["pruned_count"] for c in cells]
    text = (f"**RNP (ACC {tables.mean_std(digits=1, values=[c['acc'] for c in cells])} after, over {', '.join(sorted({c['run'] for c in cells}))} "
            "and their seeds; the slides' rows cost 1.5-4.7 ACC points).** At "
            f"its paper threshold {RnpConfig.threshold} it prunes {min(counts)}-{max(counts)} of the "
            f"{neurons} BN neurons of ResNet-20 ({100 * min(counts) / neurons:.0f}-{100 * max(counts) / neurons:.0f}%): "
            "the model goes with the backdoor. ")
    sweeps = _cells("rnp_diagnosis")
    if not sweeps:
        return text + ("Our hypothesis, not yet tested: the unlearning target (clean ACC <= 0.2) is set for 10 "
                       "classes, and on 43 classes (chance 0.023) it stops at a model whose masks fall for most "
                       "neurons. Not yet run: `python experiments/rnp_diagnosis.py` (the masks per unlearning "
                       "target, pruned at several thresholds).")
    found = []
    for c in sweeps:
        best = max(c["sweep"], key=lambda s: s["acc"] - s["asr"])
        found.append(f"{c['run']} seed {c['seed']}, unlearning to {c['unlearn_target']} "
                     f"({c['unlearning']['steps']} steps, reached {100 * c['unlearning']['accuracy']:.1f}%): "
                     f"median mask {c['mask_quantiles']['0.5']:.2f}; "
                     + ", ".join(f"{s['threshold']} prunes {s['pruned']} → ACC {100 * s['acc']:.1f} / ASR "
                                 f"{100 * s['asr']:.1f}" for s in c["sweep"])
                     + f" (widest ACC − ASR gap at {best['threshold']})")
    text += ("Masks pruned at several thresholds (`experiments/rnp_diagnosis.py`; a sweep over TEST data for "
             "diagnosis, no threshold here is RNP's result): " + "; ".join(found) + ". ")
    for (run, seed), group in tables.group(sweeps, ("run", "seed")).items():
        reached = {round(c["unlearning"]["accuracy"], 4) for c in group}
        if len({c["unlearn_target"] for c in group}) > 1 and len(reached) == 1:
            text += (f"On {run} seed {seed} every unlearning target stops at the same clean ACC "
                     f"({100 * reached.pop():.1f}%, the first check already below the lowest target), so the "
                     "target is not the cause. ")
    working = [c for c in sweeps for t in c["sweep"] if t["threshold"] < RnpConfig.threshold
               and t["asr"] < 0.1 and t["acc"] > c["before"]["acc"] - 0.1]
    if working:
        separated = sorted({f"{c['run']} seed {c['seed']}" for c in working})
        swept = {(c["run"], c["seed"]) for c in sweeps}
        text += (f"Of the {len(swept)} swept draws, on {len(separated)} ({', '.join(separated)}) a threshold below "
                 f"{RnpConfig.threshold} removes the backdoor at an ACC cost under 10 points, so there the paper's "
                 "threshold fails, not the mask learning; on the others the separation is only partial. Whether a "
                 "defender can find such a threshold without test data: bdjax's `RnpConfig(threshold=None)` picks "
                 "it on the defender's clean set (the "
                 "`rnp-clean` rows of `tsbd_tables.py --methods rnp-clean --record tsbd_rnp_clean`).")
    variant = [c for c in _cells("tsbd_rnp_clean") if c["method"] == "rnp-clean"]
    for run in sorted({c["run"] for c in variant}):
        cells = [c for c in variant if c["run"] == run]
        text += (f" Measured, {run} (seeds {', '.join(str(c['seed']) for c in cells)}): ACC "
                 f"{tables.mean_std(digits=1, values=[c['acc'] for c in cells])} / ASR {tables.mean_std(digits=1, values=[c['asr'] for c in cells])} at thresholds "
                 f"{', '.join(str(c['info'].get('threshold')) for c in cells)}.")
    return text


def cetf() -> str:
    cells = [c for c in _cells("cetf_tables_v2") if c["method"] == "cetf" and "median_area_clean" in c["info"]]
    if not cells:
        return ("**CETF clean false positives.** Record missing: `python experiments/filter_tables.py "
                "--only resnet20-gtsrb-badnets-br --methods cetf cetf-region-limit`.")
    run, image = cells[0]["run"], 32 * 32
    rate = lambda key: tables.mean_std([c[key] for c in cells], digits=1, count=False)  # noqa: E731
    trigger = [c["info"]["median_area_triggered"] for c in cells]
    clean = [c["info"]["median_area_clean"] for c in cells]
    return (f"**CETF clean false positives ({run}, {len(cells)} seed{'s' if len(cells) > 1 else ''} of "
            f"{cells[0]['triggered_size']} + {cells[0]['eval_size']} inputs: TPR {rate('tpr')} %, FPR "
            f"{rate('fpr')} %).** The regions found on triggered inputs cover {', '.join(f'{a:.0f}' for a in trigger)} "
            f"pixels (median per seed), those on clean inputs {', '.join(f'{a:.0f}' for a in clean)} "
            f"({100 * np.mean(clean) / image:.0f}% of the image, the sign's pictogram). Pasting a pictogram "
            "onto other signs makes them look like the input's class, so the paste-and-filter test passes on "
            f"clean inputs; the fitness's area term s²/S is {np.mean(clean) ** 2 / image:.0f} for a clean region "
            f"of {np.mean(clean):.0f} pixels against 1,000 per flipped image, so it cannot reject them. This is "
            "the method as written meeting a model whose classes are carried by small central regions, not a numerical "
            "bug: the triggered regions are where the trigger is." + _cetf_region_limit() + _cetf_population())


def _cetf_population() -> str:
    """Table IV (the ASR left per population) against where the search looked (``cetf_search_geometry``)."""
    cells = sorted((c for c in _cells("cetf_tables_v2") if c["method"].startswith("cetf-pop")),
                   key=lambda c: c["info"]["population"])
    if not cells:
        return (" Not yet run: Table IV, the search with populations 10-30 (`python experiments/filter_tables.py "
                "--only resnet20-gtsrb-badnets-br --methods cetf-pop10 cetf-pop20 cetf-pop30`).")
    from filter_tables import PAPER_POPULATION_ASR

    by_population = tables.group(cells, ("method",))
    left = "; ".join(f"P = {group[0]['info']['population']}: {tables.mean_std([c['asr'] for c in group], digits=2)} "
                     f"(paper {100 * PAPER_POPULATION_ASR[group[0]['info']['population']]:.2f})"
                     for group in by_population.values())
    text = f" Table IV, ASR left (%) on the triggered inputs per population: {left}."
    geometry = [c for c in _cells("cetf_search_geometry") if c["inputs"] == "triggered"]
    if not geometry:
        return text + (" Where the search looked is not measured yet (`python experiments/cetf_search_geometry.py`).")
    share = lambda group, key: tables.mean_std([c[key] for c in group], digits=1, count=False)  # noqa: E731
    per_population = tables.group(sorted(geometry, key=lambda c: c["population"]), ("population",))
    smallest = min(per_population)[0]
    priors = per_population[max(per_population)]  # the prior is the same for every population of a seed
    text += (
        f" The Grad-CAM prior region that confines the search contains the whole trigger on "
        f"{share(priors, 'prior_covers_trigger')} % of the triggered inputs (median "
        f"{np.median([c['prior_area_median'] for c in priors]):.0f} px of {32 * 32}), and the region found touches "
        "the trigger on " + ", ".join(f"{share(group, 'box_touches_trigger')} % at P = {population[0]}"
                                      for population, group in per_population.items()) + " (`cetf_search_geometry.md`)")
    located = min(np.mean([c["prior_covers_trigger"] for c in priors]),
                  np.mean([c["box_touches_trigger"] for c in per_population[(smallest,)]])) >= 0.9
    if not located:
        return text + "."
    return text + (f": on this model Grad-CAM has already located the trigger, so even P = {smallest} finds it and the "
                   f"population hardly matters; the paper's {100 * PAPER_POPULATION_ASR[smallest]:.2f} % at "
                   f"P = {smallest} needs searches that miss, which a prior this tight around the trigger leaves "
                   "little room for.")


REPAIR_RUN = "resnet20-gtsrb-badnets-br"
REPAIR_ABLATION = "repair_tables_epochs30"


def _repair_asr(cells: list[dict], run: str, method: str, k: int) -> str:
    return tables.mean_std([c["asr"] for c in _pick(cells, run, method, k=k)], digits=1, count=False)


def _repair_cost(cells: list[dict], run: str, method: str, k: int) -> str:
    return tables.mean_std(_acc_costs(_pick(cells, run, method, k=k), cells), digits=1, count=False)


def cetf_repairs() -> str:
    """Fig. 9 / Tables VII / VIII: the search (CETF's triggers against the attack's own) and the
    repair's steps (RepairConfig's 3 epochs against the epochs ablation)."""
    from bdjax.defenses.bn_repair import RepairConfig
    from bdjax.training import TrainConfig

    cells = _cells("repair_tables")
    head = "**CETF's repairs (Fig. 9: BN-unlearning ASR 0 from 1 image per class; Tables VII / VIII: 0 on every attack).** "
    cetf_cells = [c for c in cells if c["run"] == REPAIR_RUN and c["method"] == "cetf+bn-unlearn"]
    if not cetf_cells:
        return head + "Record missing: `python experiments/repair_tables.py`."
    ks = sorted({c["k"] for c in cetf_cells})
    flagged = [c["info"] for c in cetf_cells if "flagged_triggered" in c["info"]]
    suspects = _record("repair_tables")["settings"]["suspects"]
    per_k = lambda method: " / ".join(_repair_asr(cells, REPAIR_RUN, method, k) for k in ks)  # noqa: E731
    config, classes = RepairConfig(), 43
    steps = [TrainConfig(batch_size=config.batch_size).steps_per_epoch(classes * k) * config.epochs for k in ks]
    text = (head + f"On {REPAIR_RUN} CETF flags {np.mean([f['flagged_triggered'] for f in flagged]):.1f} of {suspects} "
            f"triggered and {np.mean([f['flagged_clean'] for f in flagged]):.1f} of {suspects} clean suspects (mean over "
            f"{len({c['seed'] for c in cetf_cells})} seeds), so clean-sign regions are pasted beside the trigger. "
            f"BN-unlearning leaves ASR {per_k('cetf+bn-unlearn')} at k = {', '.join(map(str, ks))} with CETF's triggers "
            f"and {per_k('attack+bn-unlearn')} with the attack's own: the gap between the two rows is the search's "
            "false positives, the gap from the attack's row to the paper's 0 is the repair. BN-cleaning leaves "
            f"{per_k('cetf+bn-clean')} with CETF's triggers and {per_k('attack+bn-clean')} with the attack's. "
            f"`RepairConfig`'s {config.epochs} epochs of batches of {config.batch_size} (the last partial batch dropped) are {', '.join(map(str, steps))} "
            f"SGD steps at k = {', '.join(map(str, ks))}.")
    others = sorted({c["run"] for c in cells if c["method"] == "attack+bn-unlearn" and c["run"] != REPAIR_RUN})
    if others:
        text += " Tables VII / VIII's attacks, the attack's samples at k = 2: BN-unlearning leaves " + ", ".join(
            f"{run.removeprefix('resnet20-gtsrb-')} {_repair_asr(cells, run, 'attack+bn-unlearn', 2)} at "
            f"{_repair_cost(cells, run, 'attack+bn-unlearn', 2)} ACC points" for run in others) + "."
    ablation = _record(REPAIR_ABLATION)
    epochs = ablation["settings"].get("epochs")
    done = [(run, k) for run, k in [(REPAIR_RUN, 2), (REPAIR_RUN, 4), *((run, 2) for run in others)]
            if _pick(ablation["cells"], run, "attack+bn-unlearn", k=k)]
    if not done:
        return text + (" Not yet run: the repairs with more steps (`python experiments/repair_tables.py --record "
                       f"{REPAIR_ABLATION} --epochs 30 --sources attack --ks 2 4`), which tells the number of steps "
                       "from the repair itself.")
    text += (f" With {epochs} epochs ({epochs // config.epochs}x the steps; an ablation run to separate the number of steps from the "
             "repair itself, not a setting of the method) BN-unlearning with the attack's samples leaves " + ", ".join(
                 f"{run.removeprefix('resnet20-gtsrb-')} k = {k}: {_repair_asr(ablation['cells'], run, 'attack+bn-unlearn', k)} "
                 f"at {_repair_cost(ablation['cells'], run, 'attack+bn-unlearn', k)} ACC points" for run, k in done)
             + "; BN-cleaning " + ", ".join(
                 f"{run.removeprefix('resnet20-gtsrb-')} k = {k}: {_repair_asr(ablation['cells'], run, 'attack+bn-clean', k)}"
                 for run, k in done) + ".")
    longer = [c["asr"] for run, k in done for c in _pick(ablation["cells"], run, "attack+bn-unlearn", k=k)]
    if longer and max(longer) <= 0.02:
        text += (" Every BN-unlearning cell then comes within 2 ASR points of the paper's 0, so what keeps the "
                 "default rows from it is the number of steps (the paper names 3 epochs, not its batch size), not "
                 "BN-unlearning itself; BN-cleaning, which takes no gradient steps, stays above the paper's 0-2.5 "
                 "on most attacks.")
    return text


def februus() -> str:
    from filter_tables import februus_coverage  # the filter table's own reading of its Februus cells

    cells = _cells("cetf_tables_v2")
    coverage = februus_coverage(cells)
    if not coverage:
        return ("**Februus.** Record missing: `python experiments/filter_tables.py --methods februus`.")
    mean_asr = {run: np.mean([c["asr"] for c in found["cells"]]) for run, found in coverage.items()}
    parts = []
    for run, found in coverage.items():
        group = found["cells"]
        parts.append(
            f"{run} ({len(group)} seed{'s' if len(group) > 1 else ''}): ACC "
            f"{tables.mean_std(digits=1, values=[c['acc'] for c in group])} / ASR "
            f"{tables.mean_std(digits=1, values=[c['asr'] for c in group])}; Grad-CAM layer `{found['feature_layer']}` "
            f"at threshold {found['cam_threshold']}: the map's peak lies {found['cam_peak_to_trigger_px']:.1f} px "
            f"from the trigger's centre (median), the trigger's pixels get {found['cam_on_trigger_mean']:.2f} of the "
            f"peak (mean) and the whole trigger is removed on {100 * found['trigger_removed_share']:.1f}% of the "
            "inputs "
            f"(ASR {100 * mean_asr[run]:.1f}% against "
            f"{100 * (1 - found['trigger_removed_share']):.1f}% of inputs that keep part of their trigger)")
    text = "**Februus (paper, GTSRB ResNet-20: ACC 77.0 / ASR 0.5).** " + "; ".join(parts) + "."
    missed = [run for run, found in coverage.items() if found["trigger_removed_share"] < 0.5 and mean_asr[run] > 0.5]
    caught = [run for run, found in coverage.items() if found["trigger_removed_share"] >= 0.5 and mean_asr[run] <= 0.5]
    if missed:
        text += (f" Where ASR stays high ({', '.join(missed)}) the removal misses the trigger, so the repainting is "
                 "not what fails: a ResNet-20's last block is an 8x8 map, and on a 2x2 patch in an image corner its "
                 "peak sits a cell or more in from the corner (the distances above), so the official threshold "
                 "removes sign pixels next to the trigger and leaves the trigger.")
    if missed and caught:
        removed = "trigger_removed_share"
        text += (f" The same 2x2 patch moved 8 px in from the corner ({', '.join(caught)}, a diagnostic zoo model "
                 "whose margin was fixed before training) is removed whole on "
                 f"{', '.join(f'{100 * coverage[r][removed]:.1f}%' for r in caught)} of the inputs "
                 f"and ASR falls to {', '.join(f'{100 * mean_asr[r]:.1f}%' for r in caught)} (paper 0.5%): the "
                 "method removes a trigger its Grad-CAM finds; the corner placement is what defeats it.")
    elif missed:
        text += (" The experiment that would separate model from method (Februus on a patch away from the border: "
                 "`python experiments/filter_tables.py --only resnet20-gtsrb-badnets-inner --methods februus`) "
                 "is not run yet.")
    text += _februus_inpainter([c for c in cells if c["method"] == "februus"])
    return text


def _februus_inpainter(own_cells: list[dict]) -> str:
    """What the ablation with a generator trained on the training split says about Februus' clean ACC,
    against ``own_cells`` (the input-filter record's Februus cells, the defender's own generator)."""
    ablation = _record("cetf_tables_v2_februus_train_inpainter")
    cells = [c for c in ablation["cells"] if c["method"] == "februus"]
    if not cells:
        return (" Clean ACC stays below the paper's 77.0 everywhere; whether our generator, trained on the "
                "defender's 86 images (the paper trains a GAN), is the cause is not measured yet "
                "(`python experiments/filter_tables.py --record cetf_tables_v2_februus_train_inpainter "
                "--februus-train-images 39209 --only resnet20-gtsrb-badnets-inner --methods februus`).")
    own = {(c["run"], c["seed"]): c for c in own_cells}
    parts, gaps = [], []
    for (run,), group in tables.group(cells, ("run",)).items():
        mine = [own[run, c["seed"]] for c in group if (run, c["seed"]) in own]
        gaps.append(np.mean([c["acc"] for c in group]) - np.mean([c["acc"] for c in mine]))
        parts.append(f"{run}: ACC {tables.mean_std([c['acc'] for c in group], digits=1)} / ASR "
                     f"{tables.mean_std([c['asr'] for c in group], digits=1, count=False)} with it, against "
                     f"{tables.mean_std([c['acc'] for c in mine], digits=1)} / "
                     f"{tables.mean_std([c['asr'] for c in mine], digits=1, count=False)} with the defender's own")
    size = ablation["settings"].get("februus_train_images")
    text = (f" Clean ACC: an ablation trains the generator on {size} clean training images instead of the "
            f"defender's 86 (`cetf_tables_v2_februus_train_inpainter.md`, the same seeds and inputs): "
            + "; ".join(parts) + ".")
    if max(gaps) < 0.05:
        text += (" More training images for the same L1 generator do not raise clean ACC (largest gain "
                 f"{100 * max(gaps):+.1f} points), so the defender's small clean set is not what costs it; what "
                 "remains is the repainting itself: on clean inputs Grad-CAM marks the region the class relies on, "
                 "and our small L1-trained generator (not the paper's GAN) does not restore it well enough to keep "
                 "the class.")
    return text


def _cetf_region_limit() -> str:
    """What the input-filter table says about CETF with and without the calibrated region limit."""
    cells = [c for c in _cells("cetf_tables_v2") if c["method"] in ("cetf", "cetf-region-limit")]
    if not cells:
        return (" Not yet run: CETF on 200 + 200 inputs with a maximum region size calibrated on the defender's "
                "clean images (`python experiments/filter_tables.py`).")
    parts = []
    for (run, method), group in tables.group(cells, ("run", "method")).items():
        rate = lambda key: tables.mean_std([c[key] for c in group], digits=1, count=False)  # noqa: E731
        limits = [c["info"].get("max_region") for c in group]
        limit = ("" if None in limits else "; the limit per seed "
                 + ", ".join(f"{round(32 * 32 * m)} px (FPR {100 * c['fpr']:.1f} %)" for m, c in zip(limits, group)))
        parts.append(f"{run} {method}: TPR {rate('tpr')} %, FPR {rate('fpr')} %, ACC {rate('acc')} % "
                     f"({len(group)} seed{'s' if len(group) > 1 else ''}, {group[0]['triggered_size']} + "
                     f"{group[0]['eval_size']} inputs{limit})")
    return (" On the input-filter table (`cetf_tables_v2.md`), the paper's rule against our ablation with a "
            "region limit set on the defender's clean images (the same screening): " + "; ".join(parts) + ".")


def tac() -> str:
    cells = _cells("tac_tables_v2")
    pipeline = [c for c in cells if c["method"] == "tac" and "candidate_count" in c.get("info", {})]
    if not pipeline:
        return "**TAC on zoo v2.** Record missing: `python experiments/tac_tables.py`."
    from bdjax.metrics import successful_defense

    before = {(c["run"], c["seed"]): c for c in cells if c["method"] == "none"}
    oracle = [c for c in cells if c["method"] == "tac-oracle"]

    def wins(group):
        return sum(successful_defense(before[c["run"], c["seed"]]["acc"], before[c["run"], c["seed"]]["asr"],
                                      c["acc"], c["asr"]) for c in group)

    n = len(pipeline)
    with_candidates = sum(c["info"]["candidate_count"] > 0 for c in pipeline)
    valid = sum(c["info"]["valid_count"] > 0 for c in pipeline)
    runs = sorted({c["run"] for c in pipeline})
    text = (f"**TAC on zoo v2 ({len(runs)} models × clean-set draws, {n} in all; the thesis's table 5.4: 0-9 of 25 "
            f"successes per architecture, 4/5 and 5/5 on ResNet-18).** The pipeline succeeded on {wins(pipeline)} of {n}. "
            f"Its funnel: low-variance candidates (z < −2) on {with_candidates} of {n} draws, a valid input-space "
            f"trigger on {valid}.")
    if oracle:
        per_run = "; ".join(f"{run} ASR {tables.mean_std(digits=1, count=False, values=[c['asr'] for c in oracle if c['run'] == run])}"
                            for run in sorted({c["run"] for c in oracle}))
        text += (f" TAC pruning with the attack's own trigger (app. A.2) succeeded on {wins(oracle)} of {len(oracle)} "
                 f"({per_run} after).")
        if wins(oracle) > wins(pipeline) and with_candidates < n / 2:
            text += (" Given the trigger, the pruning step works more often than the pipeline, and most draws "
                     "have no candidate at all: on these models the pipeline stops at the thesis's candidate "
                     "rule (a channel's output-variance z-score below −2), before TAC is computed.")
    else:
        text += " Not yet run: TAC with the attack's own trigger (`--methods tac-oracle`), which separates the steps."
    return text


def suspicion() -> str:
    table, cells = _cells("suspicion_table"), _cells("suspicion_diagnosis")
    if not cells:
        return ("**Suspiciousness pruning.** Record missing: `python experiments/suspicion_diagnosis.py` "
                "(its flagged channels against the true trigger's).")
    pruned = [c for c in table if c["method"] == "suspicion"]
    removed = sum(c["asr"] < 0.2 for c in pruned)
    n = len(cells)
    hits = sum(c["flagged_backdoor"] for c in cells)
    flagged = sum(c["flagged"] for c in cells)
    oracle_worked = [c for c in cells if c["oracle_asr"] < 0.2]
    cost = [c["acc"] - c["oracle_acc"] for c in oracle_worked]
    text = (f"**Suspiciousness pruning (paper: ASR 1.3-4.7 on CIFAR-10 ResNet-18).** On zoo v2 it took ASR below 20% "
            f"in {removed} of {len(pruned)} model × seed cells (`suspicion_table.md`). With the attack's true trigger "
            f"(`suspicion_diagnosis.md`, {n} model × seed cells): it flagged {flagged} channels in all, {hits} of them among the "
            f"backdoor channels (TAC z-score >= 2); its score and TAC correlate at Spearman "
            f"{tables.mean_std([c['spearman'] for c in cells], scale=1.0, count=False)}. Pruning those backdoor channels "
            f"instead took ASR below 20% in {len(oracle_worked)} of {n} cells")
    text += (f", at an ACC cost of {tables.mean_std(cost, digits=1, count=False)} points. " if cost else ". ")
    if hits <= flagged / 4:
        text += ("So the step that fails is the score: the channels it flags at the paper's mu are not the ones the "
                 "trigger moves. Whether that is the heuristics on a 16-64-channel ResNet-20 (the setting) or our "
                 "measurement of them (the implementation) is not separated yet: the paper's ResNet-18 with its "
                 "64-512 channels is the experiment that would.")
    return text + _suspicion_ablation()


def _frontier(cells: list[dict], heuristic: str, before: dict[int, float]):
    """(μ, cells, mean ACC cost) at the largest μ whose mean ASR over seeds is below 20% for ``heuristic``;
    None if no μ gets there."""
    by_mu = tables.group(sorted((c for c in cells if c["heuristic"] == heuristic and c["seed"] in before),
                                key=lambda c: -c["mu"]), ("mu",))
    for (mu,), group in by_mu.items():
        if np.mean([c["asr"] for c in group]) < 0.2:
            return mu, group, float(np.mean([before[c["seed"]] - c["acc"] for c in group]))
    return None


def _suspicion_ablation() -> str:
    """The ablation's trade-off (``suspicion_ablation``): per model, the largest μ at which eq. 6 takes the
    mean ASR below 20% and its ACC cost, against the paper's Table III row (its μ not stated), and the
    cheapest single measurement that gets there. Reading μ off the test split is an ablation, said so."""
    cells = _cells("suspicion_ablation")
    if not cells:
        return " The ablation over μ and the heuristics is not run yet (`python experiments/suspicion_ablation.py`)."
    from suspicion_ablation import PAPER_TABLE_III

    parts, costs, singles = [], {}, {}
    for (run,), group in tables.group(cells, ("run",)).items():
        counts = tables.group(group, ("seed",))
        full = max(len(seed_cells) for seed_cells in counts.values())  # a seed still being measured has fewer
        before = {c["seed"]: c["acc"] for c in group if c["method"] == "none" and len(counts[(c["seed"],)]) == full}
        seeds = len(before)
        row = PAPER_TABLE_III.get({"sig": "cl"}.get(group[0]["attack"], group[0]["attack"]))  # the paper's CL: our SIG
        paper = row and row["score"]
        reference = f"; paper {paper[0]:g} at ACC {paper[1]:g}" if paper else ""
        found = _frontier(group, "score", before)
        head = f"{run} ({seeds} seed{'s' if seeds > 1 else ''}): "
        if found is None:
            parts.append(head + f"no μ down to {min(c['mu'] for c in group if c['mu'] is not None):g} takes ASR "
                         f"below 20%{reference}")
        else:
            mu, chosen, costs[run] = found
            parts.append(head + f"μ = {mu:g}, {np.mean([c['pruned'] for c in chosen]):.0f} channels, ASR "
                         f"{tables.mean_std([c['asr'] for c in chosen], digits=1, count=False)} at "
                         f"{tables.mean_std([before[c['seed']] - c['acc'] for c in chosen], digits=1, count=False)} "
                         f"ACC points{reference}")
        others = [(h, f) for h in dict.fromkeys(c["heuristic"] for c in group if c["heuristic"] not in (None, "score"))
                  if (f := _frontier(group, h, before)) is not None]
        if others:
            heuristic, (mu, chosen, cost) = min(others, key=lambda item: item[1][2])
            if found is None or cost < costs[run]:
                singles[run] = (heuristic, cost, row)
                parts[-1] += (f" ({heuristic} alone: μ = {mu:g}, ASR "
                              f"{tables.mean_std([c['asr'] for c in chosen], digits=1, count=False)} at {100 * cost:.1f} "
                              "ACC points)")
    paper = [row["score"] for row in PAPER_TABLE_III.values()]
    text = (" Over μ (`suspicion_ablation.md`; μ read off the test split, so an ablation, not a setting): the largest μ "
            "at which eq. 6 takes the mean ASR below 20%, per model: " + "; ".join(parts) + ". The paper's Table III "
            f"row for eq. 6 is ASR {min(a for a, _ in paper):g}-{max(a for a, _ in paper):g}% at ACC "
            f"{min(a for _, a in paper):g}-{max(a for _, a in paper):g}% on ResNet-18")
    if costs and min(costs.values()) > 0.1:
        text += ("; here the first μ that removes the backdoor costs eq. 6 over 10 ACC points on every model, so no "
                 "threshold gives it the paper's trade-off: its ranking (the true-trigger comparison above) is what "
                 "differs")
    elif costs:
        text += ("; within 10 ACC points on " + ", ".join(run for run, cost in costs.items() if cost <= 0.1)
                 + ": there the threshold the paper leaves unstated is what differs")
    cheap = [(run, h, row) for run, (h, cost, row) in singles.items() if cost <= 0.1]
    if cheap:
        text += (". A single measurement does it within 10 points on " + ", ".join(
            f"{run} ({h}" + (f"; the paper's {h} alone: ASR {row[h][0]:g} at ACC {row[h][1]:g}" if row else "") + ")"
            for run, h, row in cheap) + ": on these models eq. 6's combination loses what one of its terms finds")
    return text + "."


ANP_RUN = "resnet20-cifar10-badnets-1pct"
ANP_COMMAND = (f"python experiments/suspicion_table.py --only {ANP_RUN} --methods anp --set anp.threshold=0.2")


def _anp_cells(record: str, k: int = 1) -> list[dict]:
    return _pick(_cells(record), ANP_RUN, "anp", k=k)


def _anp_masks(cells: list[dict], neurons: int | None) -> str:
    """'296 ± 3 of 688 neurons pruned (43%), median mask 0.09 ± 0.01': the masks' median if recorded."""
    pruned = [c["info"]["pruned_count"] for c in cells]
    text = f"{tables.mean_std(pruned, scale=1.0, digits=0, count=False)} "
    text += f"of {neurons} neurons pruned ({100 * np.mean(pruned) / neurons:.0f}%)" if neurons else "neurons pruned"
    medians = [c["info"]["mask_median"] for c in cells if "mask_median" in c["info"]]
    return text + (f", median mask {tables.mean_std(medians, scale=1.0, count=False)}" if medians else "")


def _anp_rates(cells: list[dict]) -> str:
    return (f"ACC {tables.mean_std([c['acc'] for c in cells], digits=1, count=False)} / ASR "
            f"{tables.mean_std([c['asr'] for c in cells], digits=1, count=False)} (n={len(cells)})")


def anp() -> str:
    default, fixed = _anp_cells("suspicion_table"), _anp_cells("suspicion_table_anp_paper_threshold")
    running, own = _anp_cells("anp_diagnosis_running_stats"), _anp_cells("anp_diagnosis_paper_setting", k=50)
    head = "**ANP with 10 clean CIFAR-10 images (Hashemifar et al.'s Table I: BadNets ASR 2.3 at 13.3 ACC points).** "
    if not default or not fixed:
        return head + ("Records missing: `python experiments/suspicion_table.py` and the same with "
                       "`--methods anp --set anp.threshold=0.2 --record suspicion_table_anp_paper_threshold`.")
    # The BN neurons of the model (recorded since the masks' spread is; the same model in every record).
    neurons = next((c["info"]["mask_count"] for c in default + fixed + running + own if "mask_count" in c["info"]), None)
    masks = functools.partial(_anp_masks, neurons=neurons)
    none = [c for c in _cells("suspicion_table") if c["run"] == ANP_RUN and c["method"] == "none" and c["k"] == 1]
    text = (head + f"On {ANP_RUN} (undefended {_anp_rates(none)}), at bdjax's default (the threshold chosen on the "
            f"5 held-out images) it pruned nothing in {sum(c['info']['pruned_count'] == 0 for c in default)} of "
            f"{len(default)} seeds (every candidate from 0.05 up cost more than 10 points there; one image of 5 is 20). "
            f"At ANP's own fixed 0.2: {masks(fixed)}, {_anp_rates(fixed)}: the model goes with the backdoor.")
    if running:
        text += (f" Masks learned with the running BN statistics instead of the 10-image batch's (the official "
                 f"code's `model.train()`): {masks(running)}, {_anp_rates(running)}"
                 + (": the batch statistics of a 10-image batch are not the cause." if
                    np.mean([c["acc"] for c in running]) < 0.5 else "."))
    else:
        text += f" Not yet run: the masks with running BN statistics (`{ANP_COMMAND} --set anp.batch_statistics=False " \
                "--record anp_diagnosis_running_stats`)."
    if not own:
        return text + (f" Not yet run: ANP's own clean set, 1% of the training split (`{ANP_COMMAND} "
                       "--clean-per-class 50 --seeds 0 --record anp_diagnosis_paper_setting`), which separates "
                       "the 10-image setting from the implementation.")
    reference = _cells("anp_diagnosis_paper_setting")  # its undefended cell is the eps records' too
    cost = np.mean(_acc_costs(own, reference))
    asr = np.mean([c["asr"] for c in own])
    text += (f" With ANP's own clean set (1% of the training split's size: 500 test images, k = 50, 2,000 "
             f"iterations of batch 128, threshold 0.2): {masks(own)}, {_anp_rates(own)}.")
    if asr < 0.2 and cost < 0.1:
        text += (" So ANP removes this backdoor in its own setting and the 10-image set is what breaks it: a "
                 "setting effect, not the implementation.")
    elif cost >= 0.5:
        text += (" The masks collapse with 500 images too, so the tiny set is not the whole story: ResNet-20's "
                 "16-64-channel layers (the paper's ResNet-18 is the separating run) or the implementation.")
    else:
        text += f" ({100 * cost:.1f} ACC points.)"
    return text + _anp_eps(reference, masks)


ANP_EPS_RECORDS = {"anp_diagnosis_eps02": 0.2, "anp_diagnosis_eps01": 0.1}


def _anp_eps(reference: list[dict], masks) -> str:
    """The 500-image setting with a weaker neuron perturbation (an ablation, chosen after the collapse);
    ACC costs against the undefended cell of ``reference`` (the same model, clean set and evaluation set)."""
    rows, found, medians = [], [], []
    for record, eps in ANP_EPS_RECORDS.items():
        cells = _anp_cells(record, k=50)
        if cells:
            medians += [c["info"]["mask_median"] for c in cells if "mask_median" in c["info"]]
            rows.append(f"eps {eps}: {masks(cells)}, {_anp_rates(cells)}")
            if np.mean([c["asr"] for c in cells]) < 0.2 and np.mean(_acc_costs(cells, reference)) < 0.1:
                found.append(eps)
    if not rows:
        return (f" Not yet run: the same with a weaker perturbation (`{ANP_COMMAND} --clean-per-class 50 --seeds 0 "
                "--set anp.eps=0.2 --record anp_diagnosis_eps02`, and 0.1: an ablation).")
    text = (" With a weaker neuron perturbation than the paper's eps 0.4 (an ablation chosen after seeing the "
            "collapse, not ANP's result; same 500 images): " + "; ".join(rows) + ".")
    if found:
        return text + (f" At eps {max(found)} ANP removes the backdoor and keeps the model, which fits the paper's "
                       "eps (set for ResNet-18) being too strong a perturbation for ResNet-20's thin layers.")
    if medians and min(medians) > 0.5:
        return text + (" With a weaker perturbation the masks no longer collapse, but the few neurons they leave "
                       "below 0.2 do not carry the backdoor: ANP's ranking, not only its eps, misses it on this model.")
    return text + " A weaker perturbation does not rescue it either."


def bna_all_to_all() -> str:
    run = "resnet20-cifar10-badnets-a2a"
    full = [c for c in _cells("bna_tables_v2") if c["run"] == run and c["method"] == "bna"]
    head = "**BNA on all-to-all BadNets (BNA's table 1: ASR 1.9 at 1.7 ACC points).** "
    if not full:
        return head + "Record missing: `python experiments/bna_tables_v2.py`."
    detected = [len(c["targets"]) for c in full]
    text = (head + f"The full defense detects {tables.mean_std(detected, scale=1.0, digits=1, count=False)} of 10 "
            f"targets (every class is one under c -> c + 1), ASR {tables.mean_std([c['asr'] for c in full], digits=1)}.")
    oracle = [c for c in _cells("bna_oracle_v2") if c["run"] == run and c["epochs"] == 10]
    if not oracle:
        return text + (" Not yet run: the alignment alone with all ten true triggers "
                       f"(`python experiments/bna_oracle.py --run {run} --clean-per-class 100 --eval-limit all "
                       "--seed S --record bna_oracle_v2`), which separates detection from alignment.")
    cost = [c["undefended"]["acc"] - c["acc"] for c in oracle]
    text += (f" Aligning all ten g_t with the true trigger (an oracle for detection and re-estimation, "
             f"`bna_oracle_v2`): ASR {tables.mean_std([c['asr'] for c in oracle], digits=1)} at "
             f"{tables.mean_std(cost, digits=1, count=False)} ACC points.")
    if np.mean([c["asr"] for c in oracle]) < 0.2:
        undefended = [c["asr"] for c in _cells("bna_tables_v2") if c["run"] == run and c["method"] == "none"]
        left = 100 * np.mean(undefended) * (1 - np.mean(detected) / 10)
        full_asr = 100 * np.mean([c["asr"] for c in full])
        text += (" The alignment works once every pair is known, so detection is what is lost: the MAD rule "
                 f"finds {np.mean(detected):.0f} of the ten pairs on this model. The undefended ASR times the "
                 f"undetected share of the pairs is {left:.1f} (if the pairs' ASRs are alike)")
        text += (f", about the {full_asr:.1f} the full defense leaves: the detected pairs' re-estimated triggers "
                 "do their part." if abs(left - full_asr) < 10 else
                 f", and the full defense leaves {full_asr:.1f}: the detected pairs' re-estimated triggers fall "
                 "short as well.")
    else:
        text += " Even with every pair known the alignment leaves the backdoor: the step that fails is alignment."
    return text


def bna_single_pixel() -> str:
    run = "resnet20-cifar10-sp"
    cells = _cells("bna_tables_v2")
    full = [c for c in cells if c["run"] == run and c["method"] == "bna"]
    head = "**BNA on SP, one pixel at +75/255 (BNA's table 1: ASR 1.0 at 0.8 ACC points).** "
    if not full:
        return head + "Record missing: `python experiments/bna_tables_v2.py --only resnet20-cifar10-sp`."
    undefended = [c["asr"] for c in cells if c["run"] == run and c["method"] == "none"]
    found = sum(0 in c["targets"] for c in full)
    text = (head + f"Undefended ASR {tables.mean_std(undefended, digits=1)} (below the zoo's 95 bar: the pixel "
            f"plants a weaker backdoor here). The full defense finds target 0 on {found} of {len(full)} seeds and "
            f"leaves ASR {tables.mean_std([c['asr'] for c in full], digits=1)}, flagging "
            f"{tables.mean_std([c['tpr'] for c in full], digits=1, count=False)} % of the triggered inputs.")
    oracle = sorted((c for c in _cells("bna_oracle_v2") if c["run"] == run), key=lambda c: c["epochs"])
    if not oracle:
        return text + (" Not yet run: the alignment alone with the true pixel "
                       f"(`python experiments/bna_oracle.py --run {run} --clean-per-class 100 --eval-limit all "
                       "--seed 0 --record bna_oracle_v2`), which separates the re-estimate from the alignment.")
    rows = "; ".join(f"{c['epochs']} epochs: ASR {100 * c['asr']:.1f} at {100 * (c['undefended']['acc'] - c['acc']):.1f} "
                     f"ACC points, {100 * c['tpr']:.1f} % flagged" for c in oracle)
    text += f" Aligning with the true pixel (an oracle for detection and re-estimation, seed {oracle[0]['seed']}): {rows}."
    last = oracle[-1]
    if len(oracle) > 1 and last["asr"] > oracle[0]["asr"] - 0.02:
        text += (f" {last['epochs']} epochs leave no less than {oracle[0]['epochs']}: a longer alignment is not "
                 "the cure.")
    missed = last["undefended"]["asr"] - last["tpr"]
    if abs(missed - last["asr"]) < 0.01:
        same_seed = [c["asr"] for c in full if c["seed"] == last["seed"]]
        text += (f" There the ASR left is the undefended ASR minus the flagged share ({100 * last['undefended']['asr']:.1f} "
                 f"− {100 * last['tpr']:.1f}): under the paper's rule (an input is flagged where the aligned model g_t "
                 "and the poisoned one disagree) every flagged input is one the poisoned model sent to the target, "
                 "and the ASR left is inputs on which g_t still answers the target, so the rule cannot see them. "
                 + (f"On seed {last['seed']} the re-estimated pixel costs the full defense "
                    f"{100 * (same_seed[0] - last['asr']):.1f} ASR points more than the true one; the rest"
                    if same_seed else "What is left")
                 + f" is the alignment of BN statistics, which leaves {100 * last['asr'] / last['undefended']['asr']:.0f}% "
                 "of the working triggered inputs on the target even with the true pixel.")
    return text


def section() -> str:
    return "\n\n".join(["## Diagnosis: where zoo v2 stays below the papers (generated from the records)",
                        "Each paragraph reads stored records only (`experiments/diagnosis.py`).",
                        fine_tuning(), tsbd_blended(), rnp(), tac(), suspicion(), anp(), bna_all_to_all(),
                        bna_single_pixel(), cetf(), cetf_repairs(), februus()]) + "\n"
