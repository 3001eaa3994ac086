"""Where CETF's search looked: its Grad-CAM prior region and found region against the true trigger.

    python experiments/cetf_search_geometry.py          # after filter_tables.py's CETF rows

A diagnostic for CETF Tables II-IV: it reads the screenings that ``filter_tables.py`` caches under
``results/cetf_screens/`` (the paper's population 40 on 200 triggered + 200 clean inputs, and
Table IV's populations on the triggered inputs; a screening not finished there is skipped) and,
per seed and population, measures on the triggered inputs the share of found regions that touch
the attack's trigger pixels and that cover all of them, the prior region's area and the share of
priors that contain the trigger, and on the clean inputs the found and prior areas. Nothing is
searched again. Writes ``results/cetf_search_geometry.{json,md}``; the diagnosis paragraph on CETF
reads it. Patch attacks only (an attack with a ``mask`` on under half of the image).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from bdjax.defenses import cetf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (experiments/tables.py)
from filter_tables import PAPER_RUN, SCREENS, patch_pixels  # noqa: E402

RECORD = "cetf_search_geometry"
SHARES = ("flagged", "box_touches_trigger", "box_covers_trigger", "prior_covers_trigger")  # in % in the table
AREAS = ("box_area_median", "prior_area_median")  # in pixels


def trigger_pixels(run) -> np.ndarray:
    """bool[H, W]: the pixels a patch attack writes (``filter_tables.patch_pixels``); an error for the others."""
    on_trigger = patch_pixels(run)
    if on_trigger is None:
        raise SystemExit(f"{run.record['spec']['attack']} has no patch mask: the search geometry needs one")
    return on_trigger


def geometry(boxes: np.ndarray, priors: np.ndarray, on_trigger: np.ndarray) -> dict:
    """Found regions ``boxes`` (top, left, height, width) and ``priors`` (top, left, bottom,
    right; exclusive) against the trigger pixels ``on_trigger``."""
    rows, cols = np.nonzero(on_trigger)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    y, x, h, w = boxes.T
    touches = (y < bottom) & (y + h > top) & (x < right) & (x + w > left)
    covers = (y <= top) & (y + h >= bottom) & (x <= left) & (x + w >= right)
    pt, pl, pb, pr = priors.T
    return {"box_touches_trigger": float(touches.mean()), "box_covers_trigger": float(covers.mean()),
            "box_area_median": float(np.median(h * w)), "prior_area_median": float(np.median((pb - pt) * (pr - pl))),
            "prior_covers_trigger": float(((pt <= top) & (pb >= bottom) & (pl <= left) & (pr >= right)).mean())}


def measure(run, name: str, inputs: int, record: tables.CellRecord) -> int:
    """Cells for every finished cached screening of ``name``; returns how many screenings it read."""
    on_trigger = trigger_pixels(run)
    default = cetf.CETFConfig().population_size
    read = 0
    for path in sorted(SCREENS.glob(f"{name}-seed*-{inputs}*.npz")):
        found = re.fullmatch(rf"{re.escape(name)}-seed(\d+)-{inputs}(?:-pop(\d+))?\.npz", path.name)
        if found is None:
            continue
        seed, population = int(found[1]), int(found[2] or default)
        with np.load(path) as screen:
            box, prior, flagged = screen["box"], screen["prior"], screen["poisoned"]
        if len(box) < (2 * inputs if found[2] is None else inputs):
            print(f"  {path.name}: {len(box)} inputs screened so far, skipped", flush=True)
            continue
        read += 1
        parts = {"triggered": slice(0, inputs)} | ({"clean": slice(inputs, 2 * inputs)} if found[2] is None else {})
        for part, rows in parts.items():
            if record.find(run=name, seed=seed, population=population, inputs=part) is None:
                cell = dict(run=name, seed=seed, population=population, inputs=part, n=inputs,
                            flagged=float(flagged[rows].mean()), **geometry(box[rows], prior[rows], on_trigger))
                record.add(cell)
                print(f"  {name} seed={seed} P={population} {part}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in cell.items() if isinstance(v, float)), flush=True)
    return read


def markdown(record: tables.CellRecord, command: str) -> str:
    rows = []
    groups = tables.group(record.cells, ("run", "population", "inputs"))
    for (name, population, part), cells in sorted(groups.items(), key=lambda item: (*item[0][:2], item[0][2] != "triggered")):
        shares = [tables.mean_std([c[key] for c in cells], digits=1, count=False) for key in SHARES]
        areas = [tables.mean_std([c[key] for c in cells], scale=1.0, digits=1, count=False) for key in AREAS]
        rows.append(f"| {name} | {population} | {part} | {len(cells)} | {' | '.join(shares[:3])} | "
                    f"{' | '.join(areas)} | {shares[3]} |")
    return "\n".join([
        "# Where CETF's search looked: prior and found regions against the true trigger",
        "",
        f"Generated by `{command}` from `{record.path.name}`, which reads the screenings cached by "
        "`python experiments/filter_tables.py` (CETF rows, Table IV's `cetf-popP` rows). A diagnostic, not a "
        f"table of the paper. Per seed (the clean-set draw) {record.settings['inputs']} triggered and, for the "
        "paper's population, as many clean inputs; mean ± sample std over the seeds. Touches / covers: the share "
        "of found regions with at least one / all of the trigger's pixels; areas in pixels of the 32×32 image "
        "(median per seed); prior: the dilated Grad-CAM rectangle the search is confined to.",
        "",
        "| model | population | inputs | seeds | flagged % | touches trigger % | covers trigger % | found area px "
        "| prior area px | prior contains trigger % |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[PAPER_RUN], help="zoo v2 run names (patch attacks)")
    parser.add_argument("--inputs", type=int, default=200, help="filter_tables.py's --inputs")
    args = parser.parse_args(argv)
    record = tables.CellRecord(tables.RESULTS / f"{RECORD}.json", {"inputs": args.inputs})
    for name in args.only:
        if not measure(tables.zoo_run("v2", name), name, args.inputs, record):
            raise SystemExit(f"no finished CETF screening of {name} under {SCREENS}; run `python "
                             f"experiments/filter_tables.py --only {name} --methods cetf` first")
    out = tables.RESULTS / f"{RECORD}.md"
    out.write_text(markdown(record, "python experiments/cetf_search_geometry.py"))
    print(f"wrote {out.with_suffix('')}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
