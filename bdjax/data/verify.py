"""``bdjax data verify``: the files of a data folder against known checksums.

Two sources, both used when present: a ``SHA256SUMS`` file (``sha256sum`` format: one
``<hex digest>  <path relative to the folder>`` a line; by default the one in the folder),
and the checksums bdjax knows (``KNOWN``): the shared compact files, the upstream CIFAR
pickles (published MD5s) and the upstream archives. Paths in a SHA256SUMS file must stay
inside the folder. A data folder whose files pass cannot make a loader read anything else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from bdjax.data import download
from bdjax.data.files import DataFileError
from bdjax.data.locations import DataNotFoundError

SUMS_FILE = "SHA256SUMS"

# path relative to a data folder -> (algorithm, digest)
KNOWN: dict[str, tuple[str, str]] = {
    # The shared compact files (their SHA256SUMS).
    "cifar10/cifar10_jpeg75.npz": ("sha256", "8b40e4ff617f4007460ca0b2934858e2539502f2332727be5db36c3522683ce4"),
    "gtsrb/gtsrb32.npz": ("sha256", "9d083e0b41d009022f93ccf3d75e9571c6e033231f2b19b547ef0fd3c39356ec"),
    # The upstream CIFAR pickles, as published with the archives (and pinned by torchvision).
    "cifar-10-batches-py/data_batch_1": ("md5", "c99cafc152244af753f735de768cd75f"),
    "cifar-10-batches-py/data_batch_2": ("md5", "d4bba439e000b95fd0a9bffe97cbabec"),
    "cifar-10-batches-py/data_batch_3": ("md5", "54ebc095f3ab1f0389bbae665268c751"),
    "cifar-10-batches-py/data_batch_4": ("md5", "634d18415352ddfa80567beed471001a"),
    "cifar-10-batches-py/data_batch_5": ("md5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    "cifar-10-batches-py/test_batch": ("md5", "40351d587109b95175f43aff81a1287e"),
    "cifar-100-python/train": ("md5", "16019d7e3df5f24257cddd939b257f8d"),
    "cifar-100-python/test": ("md5", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
    # The upstream archives (download=True verifies them too).
    **{archive.filename: ("sha256", archive.sha256) if archive.sha256 else ("md5", archive.md5)
       for archives in download.ARCHIVES.values() for split in archives.values() for archive in split
       if archive.sha256 or archive.md5},
}

_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """One file's verdict. status: "ok", "failed" (other digest), "missing", or "refused"
    (a path outside the folder)."""

    path: str
    algorithm: str
    expected: str
    status: str
    source: str
    actual: str | None = None

    def describe(self) -> str:
        detail = {"failed": f": {self.algorithm} is {self.actual}, expected {self.expected} ({self.source})",
                  "missing": f": listed in {self.source} but not there",
                  "refused": f": listed in {self.source} but outside the data folder"}.get(self.status, "")
        return f"{self.status.upper():<8} {self.path}{detail}"


def read_sums(path: str | os.PathLike) -> list[tuple[str, str]]:
    """[(relative path, sha256 hex)] of a ``sha256sum``-format file; DataFileError on a bad line."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SUMS_LINE.match(line.rstrip("\r"))
        if match is None:
            raise DataFileError(path, f"line {number} is not '<sha256 hex>  <path>': {line[:80]!r}")
        entries.append((match.group(2), match.group(1).lower()))
    return entries


def inside(relative: str) -> bool:
    """Whether ``relative`` names a path inside a folder (relative, no '..' part)."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts and "\0" not in relative


def verify_folder(root: str | os.PathLike, sums: str | os.PathLike | None = None) -> list[FileCheck]:
    """Check the files of data folder ``root``: those ``sums`` lists (default ``root/SHA256SUMS``
    if there), then every file of ``KNOWN`` present and not listed there.

    Raises DataNotFoundError for a missing folder or sums file, ValueError when nothing is checked.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist")
    if sums is not None and not Path(sums).is_file():
        raise DataNotFoundError(f"checksum file {sums} does not exist")
    sums = Path(sums) if sums is not None else root / SUMS_FILE if (root / SUMS_FILE).is_file() else None
    wanted = [(rel, "sha256", digest, str(sums)) for rel, digest in read_sums(sums)] if sums else []
    listed = {rel for rel, *_ in wanted}
    wanted += [(rel, algorithm, digest, "bdjax's known checksums") for rel, (algorithm, digest) in KNOWN.items()
               if rel not in listed and (root / rel).is_file()]
    if not wanted:
        raise ValueError(f"nothing to verify in {root}: no {SUMS_FILE} file there (or --sums) and none of "
                         f"the files bdjax knows ({', '.join(sorted(KNOWN)[:3])}, ...)")
    checks = []
    for rel, algorithm, expected, source in wanted:
        if not inside(rel):
            checks.append(FileCheck(rel, algorithm, expected, "refused", source))
        elif not (root / rel).is_file():
            checks.append(FileCheck(rel, algorithm, expected, "missing", source))
        else:
            actual = download.file_digest(root / rel, algorithm)
            checks.append(FileCheck(rel, algorithm, expected, "ok" if actual == expected.lower() else "failed",
                                    source, actual))
    return checks
