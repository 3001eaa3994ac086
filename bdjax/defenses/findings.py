"""What a defense found and changed, in a few numbers (``bdjax defend``'s "found" line).

A defense's ``info`` holds everything (scores, masks, triggers); a user first wants to know
whether anything was flagged and whether the model moved at all: CLP or suspicion at the
papers' thresholds can prune nothing, and a detector can find no target, which leaves the
model exactly as it was.
"""

from __future__ import annotations

import jax
import numpy as np


def summarize(info: dict) -> dict:
    """The counts among ``info``'s entries that say what was found.

    Keys (each only where the defense reports it): ``channels_pruned``, ``layers_pruned``,
    ``neurons_reinitialized``, ``pairs_searched``, ``pairs_flagged``, ``targets_flagged`` (a
    list of classes), ``triggers_found`` / ``triggers_tried``, ``warning``.
    """
    found: dict = {}
    if "pruned_count" in info:
        found["channels_pruned"] = int(info["pruned_count"])
        if isinstance(info.get("pruned"), dict):
            found["layers_pruned"] = sum(1 for channels in info["pruned"].values() if len(channels))
    if "reinitialized_count" in info:
        found["neurons_reinitialized"] = int(info["reinitialized_count"])
    detection = info.get("detection")
    if isinstance(detection, dict):  # BNA's pair search
        found["pairs_searched"] = int(detection.get("pairs_searched", 0))
        found["pairs_flagged"] = len(detection.get("detected_pairs", []))
        found["targets_flagged"] = [int(t) for t in detection.get("targets", [])]
    if "infected" in info:  # Neural Cleanse's labels
        found["targets_flagged"] = [int(t) for t in info["infected"]]
    if isinstance(info.get("triggers"), list) and all(isinstance(t, dict) and "valid" in t for t in info["triggers"]):
        found["triggers_tried"] = len(info["triggers"])
        found["triggers_found"] = sum(bool(t["valid"]) for t in info["triggers"])
    if "warning" in info:
        found["warning"] = str(info["warning"])
    return found


def changed_parameters(before: dict, after: dict) -> tuple[int, int]:
    """(elements of ``after`` that differ from ``before``, all elements) over params and batch_stats."""
    changed = total = 0
    for old, new in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        old, new = np.asarray(old), np.asarray(new)
        total += new.size
        changed += new.size if old.shape != new.shape else int(np.count_nonzero(old != new))
    return changed, total


def describe(found: dict) -> str:
    """One line for the text output, e.g. ``12 channels pruned in 3 layers``."""
    parts = []
    if "channels_pruned" in found:
        parts.append(f"{found['channels_pruned']} channels pruned"
                     + (f" in {found['layers_pruned']} layers" if found.get("layers_pruned") else ""))
    if "neurons_reinitialized" in found:
        parts.append(f"{found['neurons_reinitialized']} neurons reinitialised")
    if "pairs_searched" in found:
        parts.append(f"{found['pairs_flagged']} of {found['pairs_searched']} class pairs flagged")
    if "targets_flagged" in found:
        targets = found["targets_flagged"]
        parts.append(f"target classes flagged: {', '.join(map(str, targets))}" if targets
                     else "no target class flagged")
    if "triggers_tried" in found:
        parts.append(f"{found['triggers_found']} of {found['triggers_tried']} reconstructed triggers valid")
    if "warning" in found:
        parts.append(found["warning"])
    return "; ".join(parts)
