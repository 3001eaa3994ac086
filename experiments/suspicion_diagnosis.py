"""Why suspiciousness pruning leaves the zoo v2 backdoors: does its score see the backdoor's channels?

    python experiments/suspicion_diagnosis.py            # the suspicion table's models, seeds 0-2

A diagnostic with the attack's TRUE trigger (an oracle no defender has), to separate "the score
misses the channels that carry the backdoor" (the method, or its heuristics on this network) from
"no small set of channels carries it" (the setting: pruning cannot work on this model):

- backdoor channels: every BN-paired conv channel whose trigger-activated change (TAC, the mean
  Frobenius change of its output when the trigger is added; TAC thesis sec. 4.3) has a layer-wise
  z-score >= 2 (the thesis's u_prune), on ``--images`` clean non-target test images and their
  triggered copies;
- per seed (a draw of 1 clean test image per class, the suspicion table's defense set): the
  channels suspiciousness pruning flags at its default mu, how many backdoor channels they hold,
  and the Spearman correlation between the suspiciousness score and TAC over all channels;
- ACC / ASR (``--eval-limit`` images of the rest of the test split) after pruning the backdoor
  channels (the oracle) and after suspiciousness pruning.

Writes ``results/suspicion_diagnosis.{json,md}`` (cells per model and seed; a killed run continues).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from bdjax.data.dataset import to_float
from bdjax.defenses import suspicion, tac
from bdjax.defenses.channel_lipschitz import prune_bn_channels
from bdjax.evaluation import evaluate_model
from bdjax.runs import split_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)
from suspicion_table import MODELS  # noqa: E402

RECORD = "suspicion_diagnosis"


def backdoor_channels(run, sets, count: int) -> tuple[dict, dict]:
    """({unit: TAC f32[C]}, {unit: bool[C] TAC z >= 2}) with the true trigger on ``count`` test images."""
    clean = sets.clean.images[run.target.applies_to(sets.clean.labels)][:count]  # non-target images
    triggered = run.attack.apply_uint8(clean, jax.random.key(0))
    values = jax.device_get(tac.trigger_activated_change(run.module, run.variables, to_float(clean), to_float(triggered)))
    values = {name: np.asarray(v) for name, v in values.items()}
    return values, tac.tac_outliers(values)


def diagnose(run, name: str, seed: int, record, args):
    if record.find(run=name, seed=seed):
        return
    clean_set, sets = split_for_defense(run, 1, seed, args.data_dir, args.eval_limit)
    tac_values, backdoor = backdoor_channels(run, sets, args.images)
    scores = suspicion.suspicion_scores(run.module, run.variables, clean_set)
    flagged = jax.device_get(suspicion.suspicious_channels(scores, suspicion.SuspicionConfig.mu))
    units = [u for u in scores if u in tac_values]
    score_all = np.concatenate([np.asarray(suspicion.suspiciousness(scores[u])) for u in units])
    tac_all = np.concatenate([tac_values[u] for u in units])
    hit = sum(int(np.sum(np.asarray(flagged[u]) & backdoor[u])) for u in units)
    before = evaluate_model(run.module, run.variables, sets)
    oracle = evaluate_model(run.module, prune_bn_channels(run.module, run.variables, {u: backdoor[u] for u in units})[0], sets)
    pruned = evaluate_model(run.module, prune_bn_channels(run.module, run.variables, flagged)[0], sets)
    cell = dict(run=name, seed=seed, attack=run.record["spec"]["attack"], dataset=run.dataset,
                channels=int(tac_all.size), backdoor_channels=int(sum(int(backdoor[u].sum()) for u in units)),
                flagged=int(sum(int(np.sum(flagged[u])) for u in units)), flagged_backdoor=hit,
                spearman=float(stats.spearmanr(score_all, tac_all).statistic),
                backdoor_by_unit={u: np.flatnonzero(backdoor[u]).tolist() for u in units if backdoor[u].any()},
                acc=before.acc, asr=before.asr, oracle_acc=oracle.acc, oracle_asr=oracle.asr,
                suspicion_acc=pruned.acc, suspicion_asr=pruned.asr, eval_size=len(sets.clean), images=args.images)
    record.add(cell)
    print(f"  {name} seed {seed}: {cell['backdoor_channels']} backdoor channels of {cell['channels']}, suspicion flags "
          f"{cell['flagged']} ({hit} of them backdoor), Spearman {cell['spearman']:.2f}; oracle pruning ASR "
          f"{oracle.asr:.3f} ACC {oracle.acc:.3f}; suspicion ASR {pruned.asr:.3f}", flush=True)


def markdown(record, command: str) -> str:
    rows = []
    for (name,), cells in tables.group(record.cells, ("run",)).items():
        ms = lambda key: tables.mean_std([c[key] for c in cells], scale=1.0, digits=2, count=False)  # noqa: E731
        rows.append(f"| {name} | {len(cells)} | {cells[0]['backdoor_channels']} / {cells[0]['channels']} | "
                    f"{ms('flagged')} | {ms('flagged_backdoor')} | {ms('spearman')} | "
                    f"{tables.mean_std([c['asr'] for c in cells], count=False)} | "
                    f"{tables.mean_std([c['oracle_asr'] for c in cells], count=False)} / "
                    f"{tables.mean_std([c['acc'] - c['oracle_acc'] for c in cells], count=False)} | "
                    f"{tables.mean_std([c['suspicion_asr'] for c in cells], count=False)} / "
                    f"{tables.mean_std([c['acc'] - c['suspicion_acc'] for c in cells], count=False)} |")
    return "\n".join([
        "# Suspiciousness pruning vs the backdoor's own channels (a diagnostic with the true trigger)",
        "",
        f"Generated by `{command}` from `{record.path.name}`. Backdoor channels: TAC z-score >= 2 with the attack's",
        "true trigger (an oracle, not a defense). Flagged: what suspiciousness pruning prunes at its default",
        "mu with 1 clean image per class (per seed). Spearman: suspiciousness score vs TAC over all channels.",
        f"ASR / ACC cost in %, on {sorted({c['eval_size'] for c in record.cells})} images of the rest of the test split.",
        "",
        "| model | seeds | backdoor / all channels | flagged | flagged backdoor | Spearman | ASR before "
        "| oracle pruning ASR / ACC cost | suspicion ASR / ACC cost |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("BDJAX_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="zoo v2 run names (default: the suspicion table's that exist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=200, help="clean non-target images for TAC")
    parser.add_argument("--eval-limit", type=int, default=2000)
    args = parser.parse_args(argv)
    names = args.only or tables.trained(MODELS)
    record = tables.CellRecord(tables.RESULTS / f"{RECORD}.json", {"images": args.images, "eval_limit": args.eval_limit})
    for name in names:
        run = tables.zoo_run("v2", name)
        for seed in args.seeds:
            diagnose(run, name, seed, record, args)
            (tables.RESULTS / f"{RECORD}.md").write_text(markdown(record, "python experiments/suspicion_diagnosis.py"))
    print(f"wrote {tables.RESULTS / RECORD}.{{json,md}}")


if __name__ == "__main__":
    main()
