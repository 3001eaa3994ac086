"""Resumable training through the command line: a `bdjax train` killed with SIGKILL after an
epoch and continued with --resume ends with exactly the weights of an uninterrupted run, and
run directories are not replaced or dropped by accident."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# small-bn on 1,500 GTSRB images with the default recipe: about a second an epoch, so the kill
# lands between epochs.
TRAIN = ["train", "--dataset", "gtsrb", "--model", "small-bn", "--train-subset", "1500", "--epochs", "3",
         "--eval-limit", "200", "--quiet"]


_MAIN = "import sys; from bdjax.cli import main; sys.exit(main())"


def _bdjax(args, data_dir):
    return [sys.executable, "-c", _MAIN, *args, "--data-dir", data_dir]


def _arrays(run_dir):
    with np.load(run_dir / "variables.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_sigkill_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(_bdjax([*TRAIN, "--out", str(whole)], data_dir))
    victim = subprocess.Popen(_bdjax([*TRAIN, "--out", str(killed)], data_dir))
    state = killed / "training" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert state.exists() and not (killed / "record.json").exists(), "the kill did not land between epochs"
    stopped_at = json.loads(state.read_text())["epoch"]
    assert 1 <= stopped_at < 3

    # Without --resume the unfinished run is neither replaced nor silently restarted.
    refused = subprocess.run(_bdjax([*TRAIN, "--out", str(killed)], data_dir), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_bdjax([*TRAIN, "--out", str(killed), "--resume"], data_dir),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait() == 0
    a, b = _arrays(whole), _arrays(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not (killed / "training").exists()  # the checkpoint goes once the run is saved

    # A finished run is not replaced without --overwrite; --resume on it is a no-op.
    again = subprocess.run(_bdjax([*TRAIN, "--out", str(whole)], data_dir), capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    done = subprocess.run(_bdjax([*TRAIN, "--out", str(whole), "--resume"], data_dir), capture_output=True, text=True)
    assert done.returncode == 0 and "already trained" in done.stderr
    assert os.path.getsize(whole / "variables.npz") > 0


def test_loading_an_unfinished_run_says_how_to_continue_it(tmp_path):
    from bdjax import checkpoint

    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "state.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="unfinished training run.*--resume"):
        checkpoint.load(tmp_path)


def test_a_killed_retraining_of_a_finished_run_keeps_its_epochs(tmp_path):
    # zoo.py retrains a model whose recipe changed with overwrite=True, resume=True: the
    # retraining's checkpoint must survive a kill (it was deleted on every restart before).
    from bdjax import checkpoint
    from bdjax.runs import _check_outputs

    partial = tmp_path / checkpoint.TRAINING_DIR
    partial.mkdir()
    (partial / checkpoint.TRAINING_META).write_text("{}")
    (tmp_path / checkpoint.RECORD_FILE).write_text("{}")  # the finished run being replaced
    _check_outputs([tmp_path], resume=True, overwrite=True)
    assert (partial / checkpoint.TRAINING_META).is_file()
    _check_outputs([tmp_path], resume=False, overwrite=True)
    assert not partial.exists()
