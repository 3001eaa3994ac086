"""Opt-in download of the upstream archives, checksum-verified and atomic.

Nothing here runs at import time; ``bdjax.data.load(..., download=True)`` is the only caller.
A download is written to a hidden temporary file next to its destination and renamed into
place (``os.replace``) only after its size and checksum (or, where upstream publishes no
checksum, its structure) have been verified, so an interrupted or corrupt transfer never
leaves a file that looks complete. Extraction likewise goes through a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from bdjax.data.locations import DataNotFoundError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class DownloadError(DataNotFoundError):
    """A download failed (no network, HTTP error, truncated transfer); says where to put the file by hand."""


class ChecksumError(ValueError):
    """A file's checksum or structure is not the published one."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """An upstream archive.

    ``md5``/``sha256``: published checksums (None where upstream publishes none).
    ``expect``: a member path the archive must contain; the structural check where no
    checksum is known, and a guard against a wrong file that happens to be an archive.
    """

    url: str
    expect: str
    md5: str | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def describe(self) -> str:
        checksum = (f"sha256 {self.sha256}" if self.sha256 else
                    f"md5 {self.md5}" if self.md5 else "no published checksum")
        return f"{self.url} ({checksum})"


_GTSRB_BASE = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
CIFAR10_ARCHIVE = Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          expect="cifar-10-batches-py/data_batch_1",
                          md5="c58f30108f718f92721af3b95e74349a")
CIFAR100_ARCHIVE = Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                           expect="cifar-100-python/train",
                           md5="eb9058c3a382ffc7106e4002c42a8d85")
# The GTSRB site publishes no checksums; these MD5s are the ones torchvision and other loaders
# pin for the same files (the training zip's, e.g., in several GTSRB download scripts).
GTSRB_TRAIN_ARCHIVE = Archive(_GTSRB_BASE + "GTSRB_Final_Training_Images.zip",
                              expect="GTSRB/Final_Training/Images/00042/GT-00042.csv",
                              md5="f33fd80ac59bff73c82d25ab499e03a3")
GTSRB_TEST_ARCHIVE = Archive(_GTSRB_BASE + "GTSRB_Final_Test_Images.zip",
                             expect="GTSRB/Final_Test/Images/12629.ppm",
                             md5="c7e4e6327067d32654124b0fe9e82185")
GTSRB_TEST_GT_ARCHIVE = Archive(_GTSRB_BASE + "GTSRB_Final_Test_GT.zip", expect="GT-final_test.csv",
                                md5="fe31e9c9270bbcd7b84b7f21a9d9d9e5")

# Which archives each (dataset, split) needs. Looked up at call time, so tests can point
# an entry at a local server.
ARCHIVES: dict[str, dict[str, tuple[Archive, ...]]] = {
    "cifar10": {"train": (CIFAR10_ARCHIVE,), "test": (CIFAR10_ARCHIVE,)},
    "cifar100": {"train": (CIFAR100_ARCHIVE,), "test": (CIFAR100_ARCHIVE,)},
    "gtsrb": {"train": (GTSRB_TRAIN_ARCHIVE,), "test": (GTSRB_TEST_ARCHIVE, GTSRB_TEST_GT_ARCHIVE)},
}


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(path: str | os.PathLike, archive: Archive) -> None:
    """Raise ChecksumError unless ``path`` has the archive's checksum and expected member."""
    for algorithm, expected in (("sha256", archive.sha256), ("md5", archive.md5)):
        if expected is not None:
            actual = file_digest(path, algorithm)
            if actual != expected.lower():
                raise ChecksumError(
                    f"{path}: {algorithm} is {actual}, expected {expected} for {archive.url}")
    if not _has_member(Path(path), archive.expect):
        raise ChecksumError(f"{path}: not an archive holding {archive.expect!r} (expected {archive.url})")


def _has_member(path: Path, member: str) -> bool:
    """Whether an intact tar/zip archive holds ``member`` (zip CRCs are checked: they are all GTSRB has)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return zf.testzip() is None and member in zf.namelist()
        with tarfile.open(path) as tf:
            tf.getmember(member)
            return True
    except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile, EOFError):
        return False


def download_file(url: str, dest: str | os.PathLike, *, check: Callable[[Path], None] | None = None,
                  timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; ``check(tmp_path)`` raises to reject the bytes.

    Raises DownloadError (no network, HTTP error, truncated body) or whatever ``check``
    raises; in every failure case nothing is left at ``dest`` or beside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    expected_size = response.headers.get("Content-Length")
                    received = 0
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        received += len(chunk)
            except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
                raise DownloadError(_manual_message(url, dest, f"download failed: {error}")) from error
        # http.client returns a short body silently when the connection drops.
        if expected_size is not None and received != int(expected_size):
            raise DownloadError(_manual_message(
                url, dest, f"transfer truncated: got {received} of {expected_size} bytes"))
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _manual_message(url: str, dest: Path, reason: str) -> str:
    return (f"Could not download {url}: {reason}.\nWithout network access, fetch that file "
            f"on another machine and place it at {dest}, then call again with download=True "
            f"(it is verified and extracted, not downloaded again).")


def fetch_archive(archive: Archive, root: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """``root / archive.filename``, verified; downloaded only if missing or failing verification."""
    dest = Path(root) / archive.filename
    if dest.exists():
        try:
            verify_archive(dest, archive)
            return dest
        except ChecksumError as error:
            log.warning("%s; downloading it again", error)
    log.info("downloading %s to %s", archive.url, dest)
    return download_file(archive.url, dest, check=lambda tmp: verify_archive(tmp, archive), timeout=timeout)


def extract_archive(path: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Unpack a tar/zip into ``dest_dir`` via a temporary folder, refusing paths that escape it.

    Top-level folders are moved into place whole where they do not exist yet and merged
    otherwise (both GTSRB image zips unpack into ``GTSRB/``).
    """
    path, dest_dir = Path(path), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".extract", dir=dest_dir))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    target = (staging / name).resolve()
                    if not target.is_relative_to(staging.resolve()):
                        raise ChecksumError(f"{path}: member {name!r} would be written outside {dest_dir}")
                zf.extractall(staging)
        else:
            with tarfile.open(path) as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                    # The "data" filter rejects absolute paths, '..', links out and device files.
                    try:
                        tf.extractall(staging, filter="data")
                    except tarfile.FilterError as error:
                        raise ChecksumError(f"{path}: refusing member outside {dest_dir} "
                                            f"or not a plain file: {error}") from error
                else:
                    for member in tf.getmembers():
                        inside = (staging / member.name).resolve().is_relative_to(staging.resolve())
                        if not inside or not (member.isfile() or member.isdir()):
                            raise ChecksumError(f"{path}: refusing member {member.name!r} "
                                                f"(outside {dest_dir}, or not a plain file)")
                    tf.extractall(staging)
        _merge_into(staging, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _merge_into(source: Path, dest: Path) -> None:
    for entry in source.iterdir():
        target = dest / entry.name
        if target.is_dir() and entry.is_dir():
            _merge_into(entry, target)
        else:
            os.replace(entry, target)
