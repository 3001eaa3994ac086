"""Data readers, locations, download and splits.

Unit tests build their own tiny files (pickle folders, PPM folders, archives served from
127.0.0.1). Tests marked ``realdata`` read the shared files under ``$BDJAX_DATA_DIR`` and
are skipped when they are absent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from bdjax import data
from bdjax.data import cifar, download, gtsrb, locations, splits, tfds
from bdjax.data.dataset import CIFAR10, GTSRB, Dataset


# --- helpers: tiny fake datasets written in the upstream formats ------------------------

def random_images(rng, n, height=32, width=32):
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def write_cifar_pickles(folder: Path, name: str, sizes: dict[str, int], seed=0, bytes_keys=False):
    """Write an upstream-format pickle folder; returns {split: (images, labels)} concatenated."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    label_key, num_classes = ("labels", 10) if name == "cifar10" else ("fine_labels", 100)
    written = {}
    for split, files in cifar.PICKLE_FILES[name].items():
        parts = []
        for file in files:
            images = random_images(rng, sizes[split])
            labels = rng.integers(0, num_classes, size=sizes[split]).tolist()
            batch = {"data": cifar.nhwc_to_rows(images), label_key: labels, "batch_label": file}
            if bytes_keys:  # what Python 2 pickles give when read with encoding="bytes"
                batch = {k.encode(): v for k, v in batch.items()}
            (folder / file).write_bytes(pickle.dumps(batch, protocol=2))
            parts.append((images, np.array(labels)))
        written[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return written


def gt_csv(rows) -> str:
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    return header + "".join(f"{f};{w};{h};0;0;{w - 1};{h - 1};{c}\n" for f, w, h, c in rows)


def write_gtsrb_folders(root: Path, seed=0):
    """Official GTSRB layout with 3 classes; some images are not 32x32 (exercise the resize).

    Returns {"train": [(image, class, track)], "test": [(image, class)]} in expected order.
    """
    rng = np.random.default_rng(seed)
    expected = {"train": [], "test": []}
    for class_id in range(3):
        class_dir = root / gtsrb.TRAIN_IMAGES / f"{class_id:05d}"
        class_dir.mkdir(parents=True)
        rows, written = [], {}
        # Written out of order on purpose: the reader must sort by file name.
        for track, frame in [(1, 0), (0, 1), (0, 0), (1, 1)]:
            height, width = (32, 32) if frame == 0 else (41, 37)
            image = random_images(rng, 1, height, width)[0]
            filename = f"{track:05d}_{frame:05d}.ppm"
            Image.fromarray(image).save(class_dir / filename)
            rows.append((filename, width, height, class_id))
            written[filename] = (image if frame == 0 else  # 32x32 PPMs are taken as they are
                                 np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR)))
        (class_dir / f"GT-{class_id:05d}.csv").write_text(gt_csv(rows))
        expected["train"] += [(written[f], class_id, int(f[:5])) for f in sorted(written)]
    test_dir = root / gtsrb.TEST_IMAGES
    test_dir.mkdir(parents=True)
    rows = []
    for i, class_id in enumerate([2, 0, 1, 1, 0]):
        image = random_images(rng, 1)[0]
        Image.fromarray(image).save(test_dir / f"{i:05d}.ppm")
        rows.append((f"{i:05d}.ppm", 32, 32, class_id))
        expected["test"].append((image, class_id))
    (root / "GT-final_test.csv").write_text(gt_csv(rows))
    return expected


def class_dir_for(root, class_id):
    return root / gtsrb.TRAIN_IMAGES / f"{class_id:05d}"


def labelled(labels, num_classes=10):
    """A Dataset of 1x1 images whose pixel value is the image's index (to track identity)."""
    labels = np.asarray(labels)
    images = (np.arange(labels.size) % 256).astype(np.uint8).reshape(-1, 1, 1, 1).repeat(3, -1)
    info = dataclasses.replace(CIFAR10 if num_classes == 10 else GTSRB, image_shape=(1, 1, 3))
    return Dataset(images, labels, info)


# --- locations --------------------------------------------------------------------

def test_explicit_data_dir_beats_env_var_beats_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(locations.ENV_VAR, raising=False)
    assert locations.data_root() == tmp_path / "xdg" / "bdjax"
    monkeypatch.setenv(locations.ENV_VAR, str(tmp_path / "env"))
    assert [root for root, _ in locations.search_roots()] == [tmp_path / "env", tmp_path / "xdg" / "bdjax"]
    assert [root for root, _ in locations.search_roots(tmp_path / "arg")] == [tmp_path / "arg"]


def test_user_cache_defaults_to_home_dot_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert locations.cache_dir() == tmp_path / ".cache" / "bdjax"


def test_missing_data_error_names_files_folder_and_env_var(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load("cifar10", "train", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needed in ("cifar10/cifar10_jpeg75.npz", "cifar-10-batches-py/data_batch_1",
                   "cifar-10-python.tar.gz", str(tmp_path), "BDJAX_DATA_DIR", "download=True"):
        assert needed in message


def test_load_rejects_unknown_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.load("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load("cifar10", "val", data_dir=tmp_path)


# --- CIFAR pickles and compact JPEG file --------------------------------------------

@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_pickle_folder_round_trips_pixels_exactly(tmp_path, bytes_keys):
    written = write_cifar_pickles(tmp_path / "cifar-10-batches-py", "cifar10",
                                  {"train": 7, "test": 5}, bytes_keys=bytes_keys)
    for split in ("train", "test"):
        loaded = data.load("cifar10", split, data_dir=tmp_path)
        images, labels = written[split]
        assert loaded.images.shape == (len(labels), 32, 32, 3) and loaded.images.dtype == np.uint8
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.info is CIFAR10
    assert len(data.load("cifar10", "train", data_dir=tmp_path)) == 5 * 7


def test_cifar_rows_are_planar_red_green_blue():
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, 0], rows[0, 1024 + 1], rows[0, 2048 + 32] = 10, 20, 30  # R(0,0), G(0,1), B(1,0)
    image = cifar.rows_to_nhwc(rows)[0]
    assert (image[0, 0, 0], image[0, 1, 1], image[1, 0, 2]) == (10, 20, 30)
    assert image.sum() == 60


def test_cifar100_pickle_folder_uses_fine_labels(tmp_path):
    written = write_cifar_pickles(tmp_path / "cifar-100-python", "cifar100", {"train": 6, "test": 4})
    test = data.load("cifar100", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(test.images, written["test"][0])
    np.testing.assert_array_equal(test.labels, written["test"][1])
    assert test.info.num_classes == 100


def test_cifar_pickle_errors_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder, "cifar10", {"train": 2, "test": 2})
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar.read_cifar_pickles(folder, "cifar10", "train")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be uint8\[N, 3072\]"):
        cifar.read_cifar_pickles(folder, "cifar10", "test")


def test_compact_cifar_jpeg_file_decodes_once_per_process(tmp_path):
    rng = np.random.default_rng(0)
    blobs, labels = [], np.array([3, 1, 4], np.uint8)
    for image in random_images(rng, 3):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([b.size for b in blobs])]).astype(np.int64)
    path = tmp_path / cifar.CIFAR10_JPEG_FILE
    path.parent.mkdir()
    np.savez(path, jpeg_train=np.concatenate(blobs), offsets_train=offsets, y_train=labels,
             jpeg_test=blobs[0], offsets_test=offsets[:2], y_test=labels[:1])
    # Compact file first even when the pickle folder is there too.
    write_cifar_pickles(tmp_path / "cifar-10-batches-py", "cifar10", {"train": 1, "test": 1})
    first = data.load("cifar10", "train", data_dir=tmp_path)
    assert first.images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(first.labels, labels)
    for image, blob in zip(first.images, blobs):
        np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB")))
    again = data.load("cifar10", "train", data_dir=tmp_path)
    assert again.images is first.images  # served from the per-process cache
    assert not first.images.flags.writeable  # so no caller can corrupt the cache
    assert len(data.load("cifar10", "test", data_dir=tmp_path)) == 1


# --- GTSRB -------------------------------------------------------------------------

def test_gtsrb_official_folders_read_in_npz_order_with_tracks(tmp_path):
    expected = write_gtsrb_folders(tmp_path)
    train = data.load("gtsrb", "train", data_dir=tmp_path)
    assert train.images.shape == (12, 32, 32, 3) and train.info is GTSRB
    np.testing.assert_array_equal(train.labels, [c for _, c, _ in expected["train"]])
    np.testing.assert_array_equal(train.labels, [0] * 4 + [1] * 4 + [2] * 4)
    np.testing.assert_array_equal(train.images, np.stack([im for im, _, _ in expected["train"]]))
    tracks = data.load_gtsrb_tracks(data_dir=tmp_path)
    np.testing.assert_array_equal(tracks, [0, 0, 1, 1] * 3)
    test = data.load("gtsrb", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(test.labels, [2, 0, 1, 1, 0])
    np.testing.assert_array_equal(test.images, np.stack([im for im, _ in expected["test"]]))  # 32x32: exact


def test_gtsrb_resize_is_pillow_bilinear_of_the_whole_image(tmp_path):
    image = random_images(np.random.default_rng(1), 1, 45, 60)[0]
    Image.fromarray(image).save(tmp_path / "sign.ppm")
    resized = gtsrb.read_image(tmp_path / "sign.ppm")
    assert resized.shape == (32, 32, 3)
    np.testing.assert_array_equal(
        resized, np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR)))


def test_gtsrb_csv_class_mismatch_is_an_error(tmp_path):
    write_gtsrb_folders(tmp_path)
    csv_path = class_dir_for(tmp_path, 1) / "GT-00001.csv"
    csv_path.write_text(csv_path.read_text().replace(";1\n", ";7\n", 1))
    with pytest.raises(ValueError, match="GT-00001.csv.*ClassId 7, expected 1"):
        data.load("gtsrb", "train", data_dir=tmp_path)


def test_gtsrb_compact_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / gtsrb.GTSRB_NPZ_FILE
    path.parent.mkdir()
    arrays = dict(x_train=random_images(rng, 4), y_train=np.array([0, 0, 42, 42], np.uint8),
                  track_train=np.array([0, 1, 0, 0], np.uint16),
                  x_test=random_images(rng, 2), y_test=np.array([5, 6], np.uint8))
    np.savez_compressed(path, **arrays)
    train = data.load("gtsrb", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(train.images, arrays["x_train"])
    np.testing.assert_array_equal(train.labels, [0, 0, 42, 42])
    tracks = data.load_gtsrb_tracks(data_dir=tmp_path)
    assert tracks.dtype == np.int32 and tracks.tolist() == [0, 1, 0, 0]
    np.testing.assert_array_equal(data.load("gtsrb", "test", data_dir=tmp_path).labels, [5, 6])


# --- untrusted files: no code runs, no path escapes, bad files are named (issue 33) -----

class _RunsCode:
    """Unpickling this calls os.system: what a crafted file in a data folder could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_runs_no_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder, "cifar10", {"train": 2, "test": 2})
    marker = tmp_path / "code-ran"
    batch = {"data": cifar.nhwc_to_rows(random_images(np.random.default_rng(0), 2)), "labels": [0, 1],
             "batch_label": _RunsCode(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataFileError, match=r"test_batch: .*refusing to load (posix|nt)\.system"):
        data.load("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()
    assert len(data.load("cifar10", "train", data_dir=tmp_path)) == 10  # honest pickles still load


def test_gtsrb_csv_entries_outside_the_folder_are_refused(tmp_path):
    write_gtsrb_folders(tmp_path / "data")
    Image.fromarray(random_images(np.random.default_rng(0), 1)[0]).save(tmp_path / "secret.ppm")
    csv_path = tmp_path / "data" / "GT-final_test.csv"
    csv_path.write_text(gt_csv([("../../../secret.ppm", 32, 32, 0)]))
    with pytest.raises(data.DataFileError, match=r"GT-final_test.csv: entry '../../../secret.ppm' is not a plain"):
        data.load("gtsrb", "test", data_dir=tmp_path / "data")


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "pickled objects", "not an npz"])
def test_a_damaged_compact_file_is_named_with_a_pointer_to_data_verify(tmp_path, damage):
    path = tmp_path / gtsrb.GTSRB_NPZ_FILE
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    np.savez_compressed(path, x_test=random_images(rng, 20), y_test=np.zeros(20, np.uint8))
    payload = bytearray(path.read_bytes())
    if damage == "truncated":
        payload = payload[: len(payload) // 2]
    elif damage == "bit-flipped":  # inside x_test's compressed bytes: the zip CRC catches it
        payload[len(payload) // 2] ^= 0xFF
    elif damage == "not an npz":
        payload = b"<html>404</html>"
    else:
        buffer = io.BytesIO()
        np.savez(buffer, x_test=np.array([object()] * 2), y_test=np.zeros(2, np.uint8))
        payload = buffer.getvalue()
    path.write_bytes(bytes(payload))
    with pytest.raises(data.DataFileError, match=r"gtsrb32.npz: .*bdjax data verify"):
        data.load("gtsrb", "test", data_dir=tmp_path)


def test_damaged_pickles_images_and_jpegs_are_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder, "cifar10", {"train": 2, "test": 2})
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(data.DataFileError, match="test_batch: not a readable pickle"):
        data.load("cifar10", "test", data_dir=tmp_path)

    write_gtsrb_folders(tmp_path / "g")
    (tmp_path / "g" / gtsrb.TEST_IMAGES / "00003.ppm").write_bytes(b"P6\n32 32\n255\n" + b"\0" * 10)
    with pytest.raises(data.DataFileError, match="00003.ppm: not a readable image"):
        data.load("gtsrb", "test", data_dir=tmp_path / "g")

    path = tmp_path / "c" / cifar.CIFAR10_JPEG_FILE
    path.parent.mkdir(parents=True)
    np.savez(path, jpeg_test=np.frombuffer(b"not a jpeg at all", np.uint8), offsets_test=np.array([0, 17]),
             y_test=np.array([3], np.uint8))
    with pytest.raises(data.DataFileError, match="cifar10_jpeg75.npz: test split: JPEG 0 cannot be decoded"):
        data.load("cifar10", "test", data_dir=tmp_path / "c")


def test_labels_outside_the_dataset_name_the_file(tmp_path):
    path = tmp_path / gtsrb.GTSRB_NPZ_FILE
    path.parent.mkdir()
    np.savez(path, x_test=random_images(np.random.default_rng(0), 2), y_test=np.array([0, 43], np.uint8))
    with pytest.raises(data.DataFileError, match=r"gtsrb32.npz: labels must lie in \[0, 43\)"):
        data.load("gtsrb", "test", data_dir=tmp_path)


def test_a_dataset_refuses_images_of_another_size_channels_or_dtype():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="images are 28x28x3 .* but gtsrb images are 32x32x3"):
        Dataset(random_images(rng, 2, 28, 28), np.zeros(2, np.int32), GTSRB)
    with pytest.raises(ValueError, match="images are 32x32x1"):
        Dataset(random_images(rng, 2)[..., :1], np.zeros(2, np.int32), GTSRB)
    with pytest.raises(TypeError, match="must be uint8 .*got float32 .*to_uint8"):
        Dataset(random_images(rng, 2).astype(np.float32), np.zeros(2, np.int32), GTSRB)

# --- TFDS (optional extra) -------------------------------------------------------------

def test_load_tfds_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"pip install 'bdjax\[tfds\]'"):
        data.load_tfds("cifar10", "train")


def test_tfds_resize_keeps_channels():
    images = random_images(np.random.default_rng(0), 2, 28, 28)
    assert tfds.resize_images(images, 32).shape == (2, 32, 32, 3)
    assert tfds.resize_images(images[..., :1], 32).shape == (2, 32, 32, 1)
    assert tfds.resize_images(images, 28) is images


# --- download, against a local HTTP server ---------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/truncated.bin":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """(base URL, folder it serves) on 127.0.0.1, an ephemeral port; stopped afterwards."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def make_cifar10_tarball(folder: Path, sizes) -> tuple[Path, dict]:
    staging = folder / "staging"
    written = write_cifar_pickles(staging / "cifar-10-batches-py", "cifar10", sizes, seed=3)
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path, written


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_downloads_verifies_and_unpacks_cifar10(http_server, tmp_path, monkeypatch):
    base, served = http_server
    tarball, written = make_cifar10_tarball(served, {"train": 3, "test": 2})
    archive = download.Archive(f"{base}/{tarball.name}", expect="cifar-10-batches-py/data_batch_1",
                               md5=md5_of(tarball))
    monkeypatch.setitem(download.ARCHIVES, "cifar10", {"train": (archive,), "test": (archive,)})
    root = tmp_path / "root"
    with pytest.raises(data.DataNotFoundError):
        data.load("cifar10", "train", data_dir=root)  # never downloads unless asked
    assert not root.exists()
    train = data.load("cifar10", "train", data_dir=root, download=True)
    np.testing.assert_array_equal(train.images, written["train"][0])
    np.testing.assert_array_equal(train.labels, written["train"][1])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    tarball.unlink()  # the second split is read from the unpacked folder, no network
    test = data.load("cifar10", "test", data_dir=root)
    np.testing.assert_array_equal(test.images, written["test"][0])


def test_archive_placed_by_hand_is_verified_and_unpacked_without_network(tmp_path, monkeypatch):
    tarball, written = make_cifar10_tarball(tmp_path, {"train": 2, "test": 2})
    unreachable = download.Archive("http://127.0.0.1:9/cifar-10-python.tar.gz",
                                   expect="cifar-10-batches-py/data_batch_1", md5=md5_of(tarball))
    monkeypatch.setitem(download.ARCHIVES, "cifar10", {"train": (unreachable,), "test": (unreachable,)})
    with pytest.raises(data.DataNotFoundError, match="Found .*cifar-10-python.tar.gz: pass download=True"):
        data.load("cifar10", "test", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path, download=True)
    np.testing.assert_array_equal(test.images, written["test"][0])


def test_checksum_mismatch_leaves_no_file(http_server, tmp_path):
    base, served = http_server
    (served / "archive.tar.gz").write_bytes(b"not the archive you are looking for")
    archive = download.Archive(f"{base}/archive.tar.gz", expect="x", md5="0" * 32)
    root = tmp_path / "root"
    with pytest.raises(download.ChecksumError, match="md5 is .* expected 0000"):
        download.fetch_archive(archive, root)
    assert list(root.iterdir()) == []  # neither the file nor a temporary part


def test_truncated_transfer_leaves_no_file(http_server, tmp_path):
    base, _ = http_server
    dest = tmp_path / "root" / "truncated.bin"
    with pytest.raises(download.DownloadError, match="truncated: got 10 of 1000 bytes"):
        download.download_file(f"{base}/truncated.bin", dest)
    assert list(dest.parent.iterdir()) == []


def test_zip_without_checksum_is_verified_by_structure(http_server, tmp_path):
    base, served = http_server
    with zipfile.ZipFile(served / "wrong.zip", "w") as zf:
        zf.writestr("something/else.txt", "hello")
    archive = download.Archive(f"{base}/wrong.zip", expect="GTSRB/Final_Test/Images/12629.ppm")
    with pytest.raises(download.ChecksumError, match="not an archive holding"):
        download.fetch_archive(archive, tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


def test_gtsrb_test_zips_download_and_merge_into_one_tree(http_server, tmp_path, monkeypatch):
    base, served = http_server
    source = tmp_path / "source"
    expected = write_gtsrb_folders(source)
    with zipfile.ZipFile(served / "images.zip", "w") as zf:
        for path in sorted((source / gtsrb.TEST_IMAGES).iterdir()):
            zf.write(path, path.relative_to(source).as_posix())
    with zipfile.ZipFile(served / "gt.zip", "w") as zf:
        zf.write(source / "GT-final_test.csv", "GT-final_test.csv")
    monkeypatch.setitem(download.ARCHIVES, "gtsrb", {"test": (
        download.Archive(f"{base}/images.zip", expect="GTSRB/Final_Test/Images/00004.ppm"),
        download.Archive(f"{base}/gt.zip", expect="GT-final_test.csv"))})
    root = tmp_path / "root"
    (root / "GTSRB" / "Final_Training").mkdir(parents=True)  # an existing sibling survives the merge
    test = data.load("gtsrb", "test", data_dir=root, download=True)
    np.testing.assert_array_equal(test.labels, [c for _, c in expected["test"]])
    np.testing.assert_array_equal(test.images, np.stack([im for im, _ in expected["test"]]))
    assert (root / "GTSRB" / "Final_Training").is_dir()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_no_network_error_says_where_to_place_the_files(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setitem(download.ARCHIVES, "cifar100", {"train": (
        download.Archive(f"http://127.0.0.1:{port}/cifar-100-python.tar.gz",
                         expect="cifar-100-python/train", md5="0" * 32),)})
    with pytest.raises(download.DownloadError) as info:
        data.load("cifar100", "train", data_dir=tmp_path, download=True)
    message = str(info.value)
    assert f"place it at {tmp_path / 'cifar-100-python.tar.gz'}" in message
    assert "download=True" in message and "md5 00000" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "tar", "tar-old-python"])
def test_extraction_refuses_paths_outside_the_folder(tmp_path, monkeypatch, kind):
    if kind == "zip":
        archive = tmp_path / "evil.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("../escaped.txt", "x")
    else:
        archive = tmp_path / "evil.tar"
        with tarfile.open(archive, "w") as tf:
            member = tarfile.TarInfo("../escaped.txt")
            member.size = 1
            tf.addfile(member, io.BytesIO(b"x"))
        if kind == "tar-old-python":  # Python < 3.11.4 has no extraction filters
            monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(download.ChecksumError, match="outside"):
        download.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


# --- splits -----------------------------------------------------------------------

def test_key_or_seed_give_reproducible_streams():
    def draws(key_or_seed):
        return splits.as_numpy_rng(key_or_seed).integers(0, 1 << 30, size=4).tolist()

    key = jax.random.key(7)
    assert draws(key) == draws(key) == draws(jax.random.PRNGKey(7))  # typed and legacy keys agree
    assert draws(3) == draws(np.int64(3)) and draws(3) != draws(4)
    assert draws(key) != draws(jax.random.key(8))
    with pytest.raises(TypeError, match="jax.random.key or an int seed"):
        splits.as_numpy_rng(None)
    with pytest.raises(TypeError):
        splits.as_numpy_rng(np.zeros(2, np.float32))


def test_defense_images_come_k_per_class_and_are_never_evaluated_on():
    test_set = labelled(np.repeat(np.arange(10), [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]))
    defense, evaluation = data.clean_defense_split(test_set, 5, jax.random.key(0))
    assert np.bincount(defense.labels, minlength=10).tolist() == [5] * 10
    assert len(defense) + len(evaluation) == len(test_set)
    d_idx, e_idx = splits.defense_split_indices(test_set.labels, 5, jax.random.key(0))
    assert np.intersect1d(d_idx, e_idx).size == 0 and np.union1d(d_idx, e_idx).size == len(test_set)
    np.testing.assert_array_equal(defense.labels, test_set.labels[d_idx])
    again, _ = splits.defense_split_indices(test_set.labels, 5, jax.random.key(0))
    other, _ = splits.defense_split_indices(test_set.labels, 5, jax.random.key(1))
    np.testing.assert_array_equal(d_idx, again)
    assert not np.array_equal(d_idx, other)


def test_defense_fraction_is_stratified():
    labels = np.repeat(np.arange(10), 100)
    defense, evaluation = splits.defense_split_indices(labels, key=0, fraction=0.1)
    assert np.bincount(labels[defense]).tolist() == [10] * 10 and evaluation.size == 900


def test_defense_split_errors_name_the_problem():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        splits.defense_split_indices(labels, 0, 0)
    with pytest.raises(ValueError, match="class 1 has 2 images: too few to take 2"):
        splits.defense_split_indices(labels, 2, 0)
    with pytest.raises(ValueError, match="empty"):
        splits.defense_split_indices(np.zeros(0, int), 1, 0)
    with pytest.raises(ValueError, match="exactly one of"):
        splits.defense_split_indices(labels, 1, 0, fraction=0.5)
    with pytest.raises(ValueError, match="takes no image of class 1"):
        splits.defense_split_indices(labels, key=0, fraction=0.2)
    with pytest.raises(TypeError, match="int seed"):
        splits.defense_split_indices(labels, 1)  # no key: no hidden randomness


def test_grouped_train_val_split_never_shares_a_track():
    # 3 classes x 6 tracks x 5 frames; track ids repeat across classes, as in GTSRB.
    labels = np.repeat(np.arange(3), 30)
    tracks = np.tile(np.repeat(np.arange(6), 5), 3)
    train, val = splits.train_val_split_indices(labels, 0.34, jax.random.key(0), groups=tracks)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size
    train_pairs = set(zip(labels[train], tracks[train]))
    val_pairs = set(zip(labels[val], tracks[val]))
    assert not train_pairs & val_pairs
    assert np.bincount(labels[val]).tolist() == [10, 10, 10]  # 2 of 6 tracks per class
    again = splits.train_val_split_indices(labels, 0.34, jax.random.key(0), groups=tracks)
    np.testing.assert_array_equal(val, again[1])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        splits.train_val_split_indices(labels, 1.0, 0)


def test_ungrouped_train_val_split_is_stratified():
    dataset = labelled(np.repeat(np.arange(10), 50))
    train, val = data.train_val_split(dataset, 0.2, 0)
    assert np.bincount(val.labels).tolist() == [10] * 10 and len(train) == 400


def test_subsets_are_exact_and_proportional():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    subset = splits.stratified_subset_indices(labels, 10, 0)
    assert subset.size == 10 and np.bincount(labels[subset]).tolist() == [5, 3, 2]
    assert splits.stratified_subset_indices(labels, 7, 0).size == 7
    per_class = data.take_per_class(labelled(labels), 25, 0)
    assert np.bincount(per_class.labels).tolist() == [25, 25, 20]  # all of the smaller class


# --- real data (skipped unless $BDJAX_DATA_DIR holds the shared files) -----------------

REAL_DIR = os.environ.get("BDJAX_DATA_DIR", "")


def needs_file(relative):
    return pytest.mark.skipif(not (REAL_DIR and (Path(REAL_DIR) / relative).is_file()),
                              reason=f"$BDJAX_DATA_DIR does not hold {relative}")


GTSRB_TRAIN_COUNTS = {0: 210, 1: 2220, 33: 689, 42: 240}
GTSRB_TEST_COUNTS = {0: 60, 1: 720, 33: 210, 42: 90}


@pytest.fixture(scope="module")
def real_gtsrb():
    return data.load("gtsrb", "train"), data.load("gtsrb", "test"), data.load_gtsrb_tracks()


@pytest.fixture(scope="module")
def real_cifar10():
    # Decoded once per session (and cached by the reader for any later load in the process).
    return data.load("cifar10", "train"), data.load("cifar10", "test")


@pytest.mark.realdata
@needs_file(gtsrb.GTSRB_NPZ_FILE)
def test_real_gtsrb_has_the_official_sizes_and_class_counts(real_gtsrb):
    train, test, tracks = real_gtsrb
    assert train.images.shape == (39209, 32, 32, 3) and test.images.shape == (12630, 32, 32, 3)
    train_counts = np.bincount(train.labels, minlength=43)
    test_counts = np.bincount(test.labels, minlength=43)
    assert train_counts.size == test_counts.size == 43 and (train_counts > 0).all() and (test_counts > 0).all()
    assert {c: train_counts[c] for c in GTSRB_TRAIN_COUNTS} == GTSRB_TRAIN_COUNTS
    assert {c: test_counts[c] for c in GTSRB_TEST_COUNTS} == GTSRB_TEST_COUNTS
    assert tracks.shape == (39209,)


@pytest.mark.realdata
@needs_file(gtsrb.GTSRB_NPZ_FILE)
def test_real_gtsrb_validation_split_is_track_leak_free(real_gtsrb):
    train_set, _, tracks = real_gtsrb
    train, val = splits.train_val_split_indices(train_set.labels, 0.1, jax.random.key(0), groups=tracks)

    def pairs(idx):  # physical tracks: (class, track within class)
        return set(zip(train_set.labels[idx].tolist(), tracks[idx].tolist()))

    assert not pairs(train) & pairs(val)
    assert 0.07 < val.size / len(train_set) < 0.13
    assert np.unique(train_set.labels[val]).size == 43


@pytest.mark.realdata
@needs_file(gtsrb.GTSRB_NPZ_FILE)
def test_real_gtsrb_defense_split_is_disjoint_with_k_per_class(real_gtsrb):
    _, test, _ = real_gtsrb
    defense, evaluation = splits.defense_split_indices(test.labels, 10, jax.random.key(0))
    assert np.bincount(test.labels[defense], minlength=43).tolist() == [10] * 43
    assert np.intersect1d(defense, evaluation).size == 0
    assert defense.size + evaluation.size == len(test)


@pytest.mark.realdata
@needs_file(cifar.CIFAR10_JPEG_FILE)
def test_real_cifar10_from_the_jpeg_file(real_cifar10):
    train, test = real_cifar10
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # The JPEG re-encoding keeps the published channel means to about 1e-3.
    np.testing.assert_allclose(train.images[:5000 * 10:7].reshape(-1, 3).mean(0) / 255, CIFAR10.mean, atol=5e-3)


@pytest.mark.realdata
@needs_file(cifar.CIFAR10_JPEG_FILE)
def test_real_cifar10_defense_split_holds_out_the_defense_images(real_cifar10):
    _, test = real_cifar10
    defense, evaluation = data.clean_defense_split(test, key=jax.random.key(0), fraction=0.05)
    assert np.bincount(defense.labels).tolist() == [50] * 10
    assert len(evaluation) == 9500 and np.bincount(evaluation.labels).tolist() == [950] * 10
    d_idx, e_idx = splits.defense_split_indices(test.labels, key=jax.random.key(0), fraction=0.05)
    assert np.intersect1d(d_idx, e_idx).size == 0
    np.testing.assert_array_equal(defense.images, test.images[d_idx])
