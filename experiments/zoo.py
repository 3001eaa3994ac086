"""Train the model zoo the defense experiments use, and write its results table.

    python experiments/zoo.py                        # zoo v2: train what is missing, then the table
    python experiments/zoo.py --only resnet20-gtsrb-badnets
    python experiments/zoo.py --list                 # names and specs, in training order
    python experiments/zoo.py --table-only           # regenerate RESULTS.md from the records
    python experiments/zoo.py --variant accelerator  # BackdoorBench's recipe, PreAct-ResNet-18 (GPU/TPU)
    python experiments/zoo.py --variant v1           # the first, weak CPU zoo (thesis recipe, subsets)
    python experiments/zoo.py --jobs 5 --only A B C  # 5 trainings at once, one process each (a GPU)

Data: ``--data-dir`` or ``$BDJAX_DATA_DIR``. Each model is a run directory under
``experiments/zoo-v2/<name>/`` (``zoo-accelerator/``, ``zoo/`` for v1), loadable with
``bdjax.checkpoint.load`` / ``bdjax eval``. Training checkpoints every epoch: a killed zoo
resumes each unfinished model where it stopped (``--out`` elsewhere to keep long runs outside
a work tree), and a finished one is skipped.

v2 trains every model with the ``default`` recipe (``bdjax.recipes``) on the full training
split; the thesis architectures (small / medium / large, with and without BN) with the
``thesis`` recipe on all training images. v1 trained on stratified subsets for 6-16 epochs so
that it fit in a few CPU hours, and its ResNet-20s are weak (CIFAR-10 ACC 0.56-0.67).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bdjax import checkpoint
from bdjax.runs import RunSpec, train_run

HERE = Path(__file__).resolve().parent
ZOO_DIR = HERE / "zoo"  # v1
ZOO_DIRS = {"v1": ZOO_DIR, "v2": HERE / "zoo-v2", "accelerator": HERE / "zoo-accelerator"}

# Thesis (TAC paper sec. 5.1.3): GTSRB, target 14 (stop sign), 10% poison, 2x2 yellow patch in
# the upper-left corner, or uniform-noise blending with alpha 0.2; Adam 1e-3, 15 epochs.
GTSRB_ATTACKS = {
    "badnets": dict(attack="badnets", attack_args={"size": 2, "location": "upper-left"}),
    "blended": dict(attack="blended", attack_args={"alpha": 0.2}),
    # WaNet (CETF tables VII/VIII, TSBD table 1, BNA): the release's k = 4, s = 0.5 warp with
    # noise mode (cross ratio 2: noise-warped copies that keep their true labels). Noise mode
    # is slow to learn: on medium-bn, 8 CPU epochs gave ACC 0.82 / ASR 0.42, 16 epochs 0.81 /
    # 0.57 (BackdoorBench trains 100); the weak planting is reported beside every WaNet result.
    "wanet": dict(attack="wanet", cpu_epochs=16),
    # CETF's robustness setting: a yellow patch of random height and width (3..8 px) at a
    # random spot per image (the paper's 10-50 px on 160 px faces, scaled to 32 px).
    "random-size": dict(attack="random-size-patch", attack_args={"min_size": 3, "max_size": 8}),
    # No backdoor: what a defense must leave alone (BNA table 9, false alarms of detectors).
    "clean": dict(attack="none"),
}
CIFAR_ATTACKS = {
    # Suspiciousness / BNA papers: 3x3 random patch at a random fixed location on CIFAR-10.
    "badnets": dict(attack="badnets", attack_args={"size": 3, "pattern": "random", "location": "random"}),
    "blended": dict(attack="blended", attack_args={"alpha": 0.2}),
    # Suspiciousness paper, Table I's other two rows: Trojan (here the un-optimised trojan-square,
    # a random-colour 3x3 patch bottom-right) and a clean-label attack (SIG: only target-class
    # images carry the trigger; at 10% of the training set that is every target-class image).
    "trojan": dict(attack="trojan", attack_args={"size": 3, "location": "bottom-right"}),
    "sig": dict(attack="sig"),
    # BNA's all-to-all setting (table 1): the same BadNets trigger, class c relabelled c + 1 mod 10.
    "badnets-a2a": dict(attack="badnets", attack_args={"size": 3, "pattern": "random", "location": "random"},
                        target_mode="all_to_all"),
    # BNA table 1's additive triggers: a 2/255 chessboard (CB) and one pixel +75/255 at a
    # random fixed spot (SP). The paper poisons 100 images per source class (1.8% of the
    # training set); the zoo keeps its 10% (of a 20,000-image subset, 8 epochs).
    # At 2/255 the 8-epoch zoo recipe did not plant CB (ASR 0.077); cb-6 uses the 6/255 the
    # paper uses on CIFAR-100 "for an effective backdoor attack" (Apdx. 7.2).
    "cb": dict(attack="cb"),
    "cb-6": dict(attack="cb", attack_args={"magnitude": 6 / 255}),
    "sp": dict(attack="sp"),
    # BNA table 1's warping trigger, as the GTSRB entry (noise mode, 16 epochs: it plants slowly).
    "wanet": dict(attack="wanet", cpu_epochs=16),
    # No backdoor (BNA table 9 on CIFAR-10).
    "clean": dict(attack="none"),
}

# (model, dataset, cpu-variant train subset, cpu-variant epochs); order = priority.
ENTRIES = [
    ("resnet20", "gtsrb", 15000, 6),
    ("small-bn", "gtsrb", 15000, 8),
    ("medium-bn", "gtsrb", 15000, 8),
    ("resnet20", "cifar10", 20000, 8),
    ("small", "gtsrb", 15000, 8),
    ("medium", "gtsrb", 15000, 8),
    ("large-bn", "gtsrb", 15000, 8),
    ("large", "gtsrb", 15000, 8),
]


# Clean (attack "none") models are trained only for these architectures.
CLEAN_MODELS = ("resnet20", "medium-bn")


# --------------------------------------------------------------------------- v2 (issue 27)
# SIG at BackdoorBench's Δ = 40 (its config/attack/sig, GTSRB and CIFAR-10; the TSBD table's
# reference), not Barni et al.'s 20: on GTSRB, where the target class is 2% of the training set,
# Δ = 20/255 planted ASR 0.439 only.
V2_SIG = dict(attack="sig", attack_args={"delta": 40 / 255})
V2_GTSRB_ATTACKS = {
    # Thesis (seed 002): 2x2 yellow patch upper-left; CETF (seed 000): the same bottom-right.
    "badnets": dict(attack="badnets", attack_args={"size": 2, "location": "upper-left"}),
    "badnets-br": dict(attack="badnets", attack_args={"size": 2, "location": "bottom-right"}),
    "blended": dict(attack="blended", attack_args={"alpha": 0.2}),
    # WaNet's noise mode plants slowly (BackdoorBench trains it 50-100 epochs): the default
    # recipe's 5 GTSRB epochs gave ACC 0.956 / ASR 0.721, so the attacker trains 15.
    "wanet": dict(attack="wanet", epochs=15),
    # SIG poisons only target-class images (2% of GTSRB's training split, all 780 of them here): 5
    # epochs planted ASR 0.82 (the attacker's own measurement, 2026-12-02), so the attacker trains 15,
    # as for WaNet; 15 gave 0.817 (2026-12-03): the length is not what holds SIG back at Δ 40/255.
    "sig": dict(V2_SIG, epochs=15),
    "random-size": GTSRB_ATTACKS["random-size"],
    # LF (TSBD table 1): the low-frequency universal perturbation found on the clean zoo v2
    # ResNet-20 (max |δ| 0.1), committed beside the zoo; the path is relative to the repository root:
    # python -m bdjax.attacks.lf_trigger --run experiments/zoo-v2/resnet20-gtsrb-clean --target 14 \
    #     --out experiments/zoo-v2/lf-gtsrb-14.npy
    "lf": dict(attack="lf", attack_args={"perturbation_file": "experiments/zoo-v2/lf-gtsrb-14.npy"}),
    # SSBA (TSBD table 1): the StegaStamp-style encoder trained on GTSRB's clean training split
    # with bdjax's defaults (20-bit secret), committed beside the zoo:
    # python -m bdjax.attacks.ssba_encoder --dataset gtsrb --out experiments/zoo-v2/ssba-gtsrb.npz
    "ssba": dict(attack="ssba", attack_args={"encoder_file": "experiments/zoo-v2/ssba-gtsrb.npz"}),
    # Input-aware (CETF Tables VII / VIII, TSBD table 1): generators with the authors' settings
    # (attack and cross rate 0.1) except the mask generator's pre-training, the classifier with the
    # default recipe. A dynamic trigger plants more slowly than a patch (WaNet's 5 epochs fell
    # short). 10 joint epochs (chosen for the CPU budget before training; the paper: 600) gave ACC
    # 0.9751 / ASR 0.7282 (2026-12-05, 53 min on the shared CPU: mask epochs ~8 min, joint ~4.5;
    # the training attack-mode accuracy still rose ~4 points per epoch at the end), so 30: the
    # attacker trains until the backdoor plants, a setting of the attack, not of any defense.
    # Mask pre-training: 2 epochs instead of the authors' 25 (the planting test reaches ASR 0.86
    # after 1 on 2,000 images).
    "input-aware": dict(attack="input-aware", epochs=30, attack_args={"mask_epochs": 2}),
    "clean": dict(attack="none"),
}
# Diagnostic GTSRB ResNet-20s (not paper rows): the CETF patch moved 8 px in from the corner, to
# test Februus on a trigger away from the image border (both zoo BadNets patches sit in corners,
# where Grad-CAM's peak missed them by ~7 px). The margin was fixed before training.
V2_GTSRB_DIAGNOSTIC = {
    "badnets-inner": dict(attack="badnets", attack_args={"size": 2, "location": "bottom-right", "margin": 8}),
}
# BNA table 1 poisons 100 images per source class: 900 of CIFAR-10's 50,000 training images.
BNA_RATE = 900 / 50000
V2_CIFAR_ATTACKS = {  # in training order: the models most experiments use first
    "badnets": CIFAR_ATTACKS["badnets"],
    "blended": CIFAR_ATTACKS["blended"],
    "trojan": CIFAR_ATTACKS["trojan"],
    "sp": dict(attack="sp", poison_rate=BNA_RATE),
    "cb": dict(attack="cb", poison_rate=BNA_RATE),  # 2/255, the paper's setting
    "badnets-a2a": CIFAR_ATTACKS["badnets-a2a"],
    "sig": V2_SIG,
    "wanet": dict(attack="wanet"),
    # The suspiciousness paper's (seed 001) poison rate.
    "badnets-1pct": dict(CIFAR_ATTACKS["badnets"], poison_rate=0.01),
    "clean": dict(attack="none"),
    # TSBD table 1's LF and SSBA rows on CIFAR-10, their triggers made as GTSRB's were (above):
    # python -m bdjax.attacks.lf_trigger --run experiments/zoo-v2/resnet20-cifar10-clean --target 0 \
    #     --out experiments/zoo-v2/lf-cifar10-0.npy
    # (max |δ| 0.1; it sends 1.6% of clean images to the target on the clean model, the same after 400
    # steps as after 100: the filtered perturbation sits at the ε bound short of the authors' 20% stop).
    # Trained on this CPU (2026-12-05, 134 min beside a TSBD run): ACC 0.8436 / ASR 0.8806, below the
    # ASR bar (BackdoorBench's PreAct-ResNet-18, reported: 99.28); the likely reason, not yet separated from the
    # weaker ResNet-20, is this perturbation's 1.6% fooling rate against the authors' 20%.
    # python -m bdjax.attacks.ssba_encoder --dataset cifar10 --out experiments/zoo-v2/ssba-cifar10.npz
    # SSBA trained on this CPU (2026-12-05, 141 min over two sessions: the process ended with its session
    # after epoch 4 and the rerun resumed there): ACC 0.8566 / ASR 0.9993, within the ASR bar.
    "lf": dict(attack="lf", attack_args={"perturbation_file": "experiments/zoo-v2/lf-cifar10-0.npy"}),
    "ssba": dict(attack="ssba", attack_args={"encoder_file": "experiments/zoo-v2/ssba-cifar10.npz"}),
    # Input-aware with GTSRB's joint length and mask pre-training (30 and 2 epochs: 10 left GTSRB's
    # ASR at 0.73; the paper trains 600). Trained on this CPU beside another job (2026-12-06): 15,068 s
    # at ~100 images/s (SSBA: 236), over two sessions (the process ended with its session after epoch
    # 18 and the rerun resumed there): ACC 0.853 / ASR 0.868, below the ASR bar; its training attack
    # accuracy stayed at 0.91-0.92 over the last 8 epochs as the cosine rate went to 0.
    "input-aware": V2_GTSRB_ATTACKS["input-aware"],
}
THESIS_MODELS = ("small", "small-bn", "medium", "medium-bn", "large", "large-bn")
# Clean twins of thesis models: medium-bn's is the tests' and BNA table 9's clean model.
THESIS_CLEAN = {"medium-bn": ("clean",)}


def v2_specs(accelerator: bool = False) -> dict[str, RunSpec]:
    """Zoo v2 in training order (GTSRB ResNet-20 first: minutes each; CIFAR-10: hours each).

    ``accelerator``: BackdoorBench's recipe (100 epochs) with PreAct-ResNet-18 on CIFAR-10 and
    GTSRB, the same attacks; for a GPU or TPU, nothing else depends on it.
    """
    specs = {}
    groups = [("resnet20", "gtsrb", {**V2_GTSRB_ATTACKS, **V2_GTSRB_DIAGNOSTIC}, "default"),
              *[(m, "gtsrb", {k: V2_GTSRB_ATTACKS[k] for k in ("badnets", "blended", *THESIS_CLEAN.get(m, ()))},
                 "thesis") for m in THESIS_MODELS],
              ("resnet20", "cifar10", V2_CIFAR_ATTACKS, "default")]
    if accelerator:
        groups = [("preact-resnet18", "cifar10", V2_CIFAR_ATTACKS, "backdoorbench"),
                  ("preact-resnet18", "gtsrb", V2_GTSRB_ATTACKS, "backdoorbench")]
    for model, dataset, attacks, recipe in groups:
        for attack_name, attack in attacks.items():
            attack = {"poison_rate": 0.1, **attack}
            if recipe == "backdoorbench":  # its 100 epochs, not the CPU zoo's per-attack lengths
                attack.pop("epochs", None)
            specs[f"{model}-{dataset}-{attack_name}"] = RunSpec(
                dataset=dataset, model=model, target=14 if dataset == "gtsrb" else 0,
                recipe=recipe, seed=0, **attack)
    return specs


def set_aside(path: Path, target: Path) -> Path:
    """Move ``path`` to ``target`` (``target-2``, ``-3``, ... when taken), outside the run folder
    that a finished save replaces whole; returns where it went."""
    chosen, count = target, 1
    while chosen.exists():
        count += 1
        chosen = target.with_name(f"{target.name}-{count}")
    path.rename(chosen)
    return chosen


def variant_specs(variant: str) -> dict[str, RunSpec]:
    if variant == "v1":
        return zoo_specs()
    return v2_specs(accelerator=variant == "accelerator")


# --------------------------------------------------------------------------- v1
def zoo_specs(full: bool = False) -> dict[str, RunSpec]:
    """The first zoo (thesis recipe; ``full``: all data, 15 epochs instead of the CPU subsets)."""
    specs = {}
    for model, dataset, subset, epochs in ENTRIES:
        attacks = GTSRB_ATTACKS if dataset == "gtsrb" else CIFAR_ATTACKS
        for attack_name, attack in attacks.items():
            if attack_name == "clean" and model not in CLEAN_MODELS:
                continue
            attack = dict(attack)
            cpu_epochs = attack.pop("cpu_epochs", epochs)
            target = 14 if dataset == "gtsrb" else 0
            specs[f"{model}-{dataset}-{attack_name}"] = RunSpec(
                dataset=dataset, model=model, target=target, poison_rate=0.1, recipe="thesis",
                epochs=None if full else cpu_epochs, train_subset=None if full else subset,
                eval_limit=None, seed=0, **attack)
    return specs


# TAC thesis table 5.4, the backdoored models' mean (ACC, ASR) over 25 models per architecture.
THESIS_TABLE_5_4 = {
    ("small", "badnets"): (0.84, 0.99), ("medium", "badnets"): (0.89, 1.00), ("large", "badnets"): (0.92, 1.00),
    ("small-bn", "badnets"): (0.90, 1.00), ("medium-bn", "badnets"): (0.95, 1.00),
    ("large-bn", "badnets"): (0.96, 1.00),
    ("small", "blended"): (0.82, 0.85), ("medium", "blended"): (0.89, 0.96), ("large", "blended"): (0.90, 0.99),
    ("small-bn", "blended"): (0.90, 0.99), ("medium-bn", "blended"): (0.94, 1.00),
    ("large-bn", "blended"): (0.96, 1.00),
}


def v2_bar(spec: RunSpec) -> tuple[float, float] | None:
    """Issue 27's (ACC, ASR) minimum for a zoo v2 model; None: no bar set.

    Default-recipe ResNet-20s: the issue's numbers. Thesis architectures: "in the thesis's
    range", taken as its table 5.4 mean less 0.03 ACC and 0.05 ASR (its means are over 25 models);
    a clean thesis model: its BadNets twin's ACC bar (a clean model has no ASR).
    """
    if spec.recipe == "thesis" and spec.attack == "none" and (spec.model, "badnets") in THESIS_TABLE_5_4:
        return round(THESIS_TABLE_5_4[spec.model, "badnets"][0] - 0.03, 2), 0.0  # its BadNets twin's ACC bar
    if (spec.model, spec.attack) in THESIS_TABLE_5_4 and spec.recipe == "thesis":
        acc, asr = THESIS_TABLE_5_4[spec.model, spec.attack]
        return round(acc - 0.03, 2), round(asr - 0.05, 2)
    if spec.model != "resnet20" or spec.recipe != "default":
        return None
    if spec.dataset == "gtsrb":
        return 0.96, 0.90 if spec.attack == "wanet" else 0.95
    slow = spec.attack in ("wanet", "sig")
    return (0.88 if slow else 0.90), (0.85 if spec.attack == "wanet" or spec.target_mode == "all_to_all" else 0.95)


def recipe_drift(record: dict, spec: RunSpec) -> list[str]:
    """How the training a record stores differs from what ``spec`` resolves to now ([]: not at all).

    A recipe changed after a model was trained leaves its spec equal ("recipe: default") and its
    training different; such a model is retrained by ``zoo.py`` and flagged in the table meanwhile.
    """
    now = dataclasses.asdict(spec.train_config())
    then = record["train_config"]
    return [f"{key} {then[key]} (now {now[key]})" for key in sorted(now.keys() & then.keys())
            if then[key] != now[key]]


def _meets(spec: RunSpec, metrics: dict) -> str:
    bar = v2_bar(spec)
    if bar is None:
        return "—"
    misses = [f"{name} < {low:.2f}" for name, low, value in
              (("ACC", bar[0], metrics["acc"]), ("ASR", bar[1], metrics["asr"]))
              if value is not None and value < low]
    return "no: " + ", ".join(misses) if misses else "yes"


def spec_drift(record: dict, spec: RunSpec) -> list[str]:
    """How the spec a record was trained with differs from ``spec`` ([]: not at all)."""
    now, then = dataclasses.asdict(spec), RunSpec.from_record(record["spec"]).__dict__
    return [f"{key} {then[key]} (now {now[key]})" for key in sorted(now) if then.get(key) != now[key]]


def _bar_cell(record: dict, spec: RunSpec) -> str:
    recipe = recipe_drift(record, spec)  # "epochs 5 (now 15)" says more than the spec's "epochs None (now 15)"
    drift = recipe + [d for d in spec_drift(record, spec) if d.split()[0] not in {r.split()[0] for r in recipe}]
    return _meets(spec, record["metrics"]) + ("; stale, trained with " + ", ".join(drift) if drift else "")


def _rate(value) -> str:
    """A rate for the table; a clean model has no ASR (None)."""
    return "—" if value is None else f"{value:.4f}"


def _trainer_check() -> list[str]:
    """The zoo table's note on the CIFAR-10 ACC ceiling, from ``torch_reference_train``'s record (if any)."""
    path = HERE / "results" / "torch_reference_train.json"
    recorded = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [row for row in recorded if row.get("bdjax")]
    if not rows:
        return []
    row = rows[0]
    note = (f"The CIFAR-10 ACC bar is not a bdjax trainer problem: {row['setting']} trained by a plain PyTorch "
            f"loop on the same images tests at {row['acc']:.4f}, bdjax's {row['bdjax']['run']} at "
            f"{row['bdjax']['acc']:.4f} (final training accuracy {row['final_train_accuracy']:.4f} / "
            f"{row['bdjax']['final_train_accuracy']:.4f}; `experiments/results/torch_reference_train.md`).")
    dose = sorted((r for r in recorded if r.get("jpeg_quality") is not None and r["setting"].startswith(row["setting"] + "-")
                   and r["seed"] == row["seed"]), key=lambda r: -r["jpeg_quality"])
    if dose:
        note += (" The same PyTorch recipe on the shared images compressed once more (`--jpeg-quality`): " + "; ".join(
            f"JPEG-{r['jpeg_quality']} ({r['psnr_to_shared_db']} dB PSNR to the shared images) ACC {r['acc']:.4f}, "
            f"final training accuracy {r['final_train_accuracy']:.4f}" for r in dose) + ".")
    return [note, ""]


def write_table(zoo_dir: Path = ZOO_DIR, variant: str = "v1") -> Path:
    """RESULTS.md (the table) and results.json (the records' numbers) of one zoo folder."""
    rows, entries = [], []
    current = variant_specs(variant)  # what each run's spec is today: a changed one is stale
    for run_dir in sorted(p for p in zoo_dir.iterdir() if (p / checkpoint.RECORD_FILE).is_file()):
        record = checkpoint.read_record(run_dir)
        spec, m = RunSpec.from_record(record["spec"]), record["metrics"]
        attack = spec.attack + (" (all-to-all)" if spec.target_mode == "all_to_all" else "")
        images_per_second = record.get("images_per_second")
        rows.append(f"| {run_dir.name} | {record['model']} | {record['dataset']} | {attack} | "
                    f"{record['poison_count']} | {spec.recipe} | {record['train_size']} | "
                    f"{record['train_config']['epochs']} | {m['acc']:.4f} | {_rate(m['asr'])} | "
                    f"{'—' if images_per_second is None else f'{images_per_second:.0f}'} | "
                    f"{record['train_seconds'] / 60:.1f} | {record.get('backend', '?')} |"
                    + (f" {_bar_cell(record, current.get(run_dir.name, spec))} |" if variant == "v2" else ""))
        entries.append({"run": run_dir.name, "spec": record["spec"], "train_config": record["train_config"],
                        "metrics": m, "eval_size": record["eval_size"], "train_size": record["train_size"],
                        "poison_count": record["poison_count"], "train_seconds": record["train_seconds"],
                        "images_per_second": images_per_second, "backend": record.get("backend"),
                        "variables_sha256": record["variables_sha256"],
                        "recipe_drift": recipe_drift(record, spec),
                        **({"bar": v2_bar(spec), "meets_bar": _meets(spec, m)} if variant == "v2" else {})})
    trained = {entry["run"] for entry in entries}
    missing = [name for name in variant_specs(variant) if name not in trained]
    command = "python experiments/zoo.py" + ("" if variant == "v2" else f" --variant {variant}")
    text = "\n".join([
        f"# Model zoo ({variant})",
        "",
        f"Generated by `{command} --table-only` from the run records in this folder",
        "(the same numbers are in `results.json`). Each row is reproduced by",
        f"`{command} --only RUN` (with `BDJAX_DATA_DIR` set).",
        "ACC on the full clean test split; ASR on the triggered test images whose true class is not",
        "the target. Poison = poisoned training images. Images/s and minutes are training wall-clock",
        "on the machine named in `backend` (a 2-core CPU here; other jobs may have shared it, and",
        "rows from before images/s was recorded show —).",
        *(["`gpu` rows: one NVIDIA H200 lent for a session, `--jobs 5` (then `--jobs 3`) concurrent",
           "processes, so images/s is one process's share of the GPU (WaNet, in a later session: beside two",
           "`recipe_checks.py` trainings; its first copy, ACC 0.8500 / ASR 0.9642, was lost in the transfer",
           "back, and this is the retrained one); XLA's default float32 precision there (which lets cuDNN use",
           "TF32). Four of them re-evaluated on the CPU moved ACC / ASR by at most 0.0005 (`device-logs/`:",
           "the runs' logs, GPU utilisation, the CPU re-evaluation)."]
          if (zoo_dir / "device-logs").is_dir() else []),
        "",
        *(["Bar: issue 27's minimum for default-recipe ResNet-20s (GTSRB ACC >= 0.96, ASR >= 0.95, "
           "WaNet >= 0.90; CIFAR-10 ACC >= 0.90, SIG / WaNet >= 0.88, ASR >= 0.95, WaNet / all-to-all "
           ">= 0.85); for the thesis architectures the TAC thesis's table 5.4 mean less 0.03 ACC / 0.05 ASR. "
           "A row that misses its bar is shown as it is; \"stale\" marks a model trained before its "
           "spec or recipe changed (kept until it is retrained). Diagnostic models, not paper rows: "
           + ", ".join(f"`resnet20-gtsrb-{name}`" for name in V2_GTSRB_DIAGNOSTIC)
           + " (CETF's patch 8 px in from the corner, to test Februus away from the image border).", "",
           *_trainer_check()] if variant == "v2" else []),
        "| run | model | dataset | attack | poison | recipe | train size | epochs | ACC | ASR | images/s "
        "| train min | backend |" + (" bar |" if variant == "v2" else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if variant == "v2" else ""),
        *rows,
        "",
        *([f"Not trained yet ({len(missing)}): " + ", ".join(f"`{name}`" for name in missing), ""]
          if missing else []),
    ])
    path = zoo_dir / "RESULTS.md"
    path.write_text(text)
    checkpoint.atomic_write(zoo_dir / "results.json", (json.dumps(entries, indent=1) + "\n").encode())
    return path


def training_epoch(run_dir: Path) -> int | None:
    """The last checkpointed epoch of an unfinished run in ``run_dir`` (None: none yet)."""
    try:
        return json.loads((run_dir / checkpoint.TRAINING_DIR / checkpoint.TRAINING_META).read_text())["epoch"]
    except (OSError, KeyError, ValueError):
        return None


def train_concurrently(names: list[str], jobs: int, out: Path, argv: list[str], poll: float = 20.0,
                       script: Path = Path(__file__).resolve()) -> list[str]:
    """Train ``names`` as ``jobs`` concurrent ``zoo.py --only NAME`` processes, the rest queued in order
    (``--jobs N --only A B C``: ``--only``'s order).

    For an accelerator that one small model's training does not fill: on one H200 the CIFAR-10
    ResNet-20s trained at ~26,000 images/s in all 5 at a time and ~23,000 3 at a time (their
    records); on a CPU the processes would compete for the same cores. Each process writes
    ``OUT/NAME.log``; the epochs they checkpoint are printed as they come. A process stopped by
    a signal to this one is stopped too, leaving its last epoch's state to resume from.
    Returns the names whose process failed.
    """
    pending, running, failed, epochs = list(names), {}, [], {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the children are stopped too
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                log = open(out / f"{name}.log", "w")
                command = [sys.executable, str(script), *argv, "--only", name, "--out", str(out)]
                running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
                print(f"[start] {name}", flush=True)
            time.sleep(poll)
            for name, (process, log) in list(running.items()):
                epoch = training_epoch(out / name)
                if epoch is not None and epoch != epochs.get(name):
                    epochs[name] = epoch
                    print(f"[epoch] {name}: {epoch}", flush=True)
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                if process.returncode:
                    failed.append(name)
                    tail = (out / f"{name}.log").read_text().splitlines()[-5:]
                    print(f"[failed] {name} (exit {process.returncode}): " + " | ".join(tail), flush=True)
                else:
                    last = (out / f"{name}.log").read_text().strip().splitlines()[-1:]
                    print(f"[exit] {name}: {' '.join(last)}", flush=True)
    finally:
        for process, log in running.values():
            process.terminate()
            process.wait()
            log.close()
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(ZOO_DIRS), default="v2")
    parser.add_argument("--only", nargs="*", help="train only these runs")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="zoo folder (default: the variant's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many runs at once, one process each (for an accelerator; default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    specs = variant_specs(args.variant)
    out = args.out or ZOO_DIRS[args.variant]
    if args.list:
        for name, spec in specs.items():
            print(name, dataclasses.asdict(spec))
        return 0
    unknown = sorted(set(args.only or ()) - set(specs))
    if unknown:
        parser.error(f"unknown run(s) {unknown} in variant {args.variant}; see --list")
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and not args.table_only:
        names = list(dict.fromkeys(args.only)) if args.only else list(specs)  # --only's order: priority
        child_args = ["--variant", args.variant] + (["--data-dir", args.data_dir] if args.data_dir else [])
        failed = train_concurrently(names, args.jobs, out, child_args)
        print(f"wrote {write_table(out, args.variant)}")
        return 1 if failed else 0
    if not args.table_only:
        for name, spec in specs.items():
            if args.only and name not in args.only:
                continue
            run_dir = out / name
            overwrite = False
            if (run_dir / checkpoint.RECORD_FILE).is_file():
                record = checkpoint.read_record(run_dir)
                drift = recipe_drift(record, spec)
                if RunSpec.from_record(record["spec"]) == spec and not drift:
                    print(f"[skip] {name}: already trained", flush=True)
                    continue
                print(f"[retrain] {name}: the spec or recipe changed {drift}", flush=True)
                overwrite = True
            started = time.perf_counter()
            try:
                run = train_run(spec, run_dir, args.data_dir, progress=False, resume=True, overwrite=overwrite)
            except checkpoint.StaleTrainingState as stale:  # an unfinished training of the spec before
                kept = set_aside(Path(stale.path), out / f"{name}.stale-training")
                print(f"[restart] {name}: its unfinished training was of another spec or recipe; kept as {kept}",
                      flush=True)
                run = train_run(spec, run_dir, args.data_dir, progress=False, resume=True, overwrite=overwrite)
            m = run.record["metrics"]
            print(f"[done] {name}: ACC {m['acc']:.4f} ASR {_rate(m['asr'])} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            write_table(out, args.variant)
    print(f"wrote {write_table(out, args.variant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
