"""Pytrees as flat ``{"a/b/c": leaf}`` dictionaries and back: how runs and attacks are saved."""

from __future__ import annotations

import io

import jax
import numpy as np


def flat_items(tree):
    """("a/b/c", leaf) for every leaf of ``tree``, keys joined with "/"."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        yield "/".join(str(getattr(k, "key", k)) for k in path), leaf


def unflatten(flat: dict) -> dict:
    """Nested dicts from "/"-joined keys (``flat_items``'); already nested values stay nested."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def npz_bytes(arrays: dict) -> bytes:
    """The bytes of an .npz file holding ``arrays`` (name -> array), for an atomic write or a hash
    (into a buffer: ``np.savez`` on a path would append .npz to any other suffix)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return buffer.getvalue()
