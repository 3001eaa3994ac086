"""The command-line contract: ``eval --json`` and ``defend --json`` print the documented keys."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bdjax import checkpoint
from bdjax.cli import main

from conftest import MODELS_DIR

pytestmark = [pytest.mark.realdata]


def test_eval_json_prints_acc_asr_sia(gtsrb_badnets_dir, data_dir, capsys):
    assert main(["eval", str(gtsrb_badnets_dir), "--json", "--eval-limit", "500", "--data-dir", data_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"acc", "asr", "sia"}
    assert all(0.0 <= v <= 1.0 for v in report.values())


@pytest.mark.slow
def test_defend_ft_json_and_saved_repaired_run(gtsrb_badnets_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "repaired"
    code = main(["defend", "ft", str(gtsrb_badnets_dir), "--clean-per-class", "5", "--json",
                 "--eval-limit", "1000", "--set", "epochs=10", "--out", str(out), "--data-dir", data_dir])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"method", "before", "after", "seconds", "der", "defense_size", "eval_size",
                           "triggered_size", "found", "changed", "no_op"}
    assert 900 < report["triggered_size"] < 1000  # the held-out images outside the target class
    assert report["method"] == "ft" and set(report["after"]) == {"acc", "asr", "sia"}
    assert report["defense_size"] == 5 * 43 and report["eval_size"] == 1000 and not report["no_op"]
    assert main(["eval", str(out), "--json", "--eval-limit", "1000", "--data-dir", data_dir]) == 0
    json.loads(capsys.readouterr().out)


def test_unknown_config_field_is_a_clear_error(gtsrb_badnets_dir, data_dir, capsys):
    code = main(["defend", "ft", str(gtsrb_badnets_dir), "--set", "epoch=3", "--data-dir", data_dir])
    assert code == 2
    assert "has no field(s) ['epoch']" in capsys.readouterr().err


def test_missing_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_directory_is_a_clear_error(gtsrb_badnets_dir, tmp_path, capsys):
    assert main(["eval", str(gtsrb_badnets_dir), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "gtsrb" in err and "BDJAX_DATA_DIR" in err


# --------------------------------------------------------------------------- issue 33: the CLI contract
ZOO_CLEAN = Path(__file__).resolve().parents[1] / "experiments" / "zoo" / "medium-bn-gtsrb-clean"


def _strict_json(text):
    """json.loads that refuses NaN / Infinity (Python's default parser accepts them)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def run_copy(tmp_path):
    """A copy of the committed 4k-image run that a test may overwrite."""
    return Path(shutil.copytree(MODELS_DIR / "medium-bn-gtsrb-badnets-4k", tmp_path / "run"))


def test_eval_json_of_a_clean_model_gives_null_asr_not_nan(data_dir, capsys):
    assert main(["eval", str(ZOO_CLEAN), "--json", "--eval-limit", "200", "--data-dir", data_dir]) == 0
    report = _strict_json(capsys.readouterr().out)
    assert report["asr"] is None and report["sia"] is None and 0.0 < report["acc"] <= 1.0


def test_train_attack_none_prints_dashes_for_the_missing_rates(tmp_path, monkeypatch, capsys):
    import bdjax.runs

    record = {"metrics": {"acc": 0.9, "asr": float("nan"), "sia": float("nan")}, "train_seconds": 1.0}
    monkeypatch.setattr(bdjax.runs, "train_run", lambda *a, **k: checkpoint.Run(None, {}, record, None, None))
    assert main(["train", "--attack", "none", "--out", str(tmp_path / "clean"), "--quiet"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.split() == ["model", "0.9000", "—", "—"]


@pytest.mark.parametrize("argv, flag", [
    (["train", "--train-subset", "0"], "--train-subset"),
    (["train", "--eval-limit", "-5"], "--eval-limit"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--weight-decay", "-1e-4"], "--weight-decay"),
    (["train", "--poison-rate", "1.5"], "--poison-rate"),
    (["eval", "RUN", "--eval-limit", "0"], "--eval-limit"),
    (["defend", "ft", "RUN", "--clean-per-class", "0"], "--clean-per-class"),
])
def test_zero_negative_and_non_finite_counts_are_refused_naming_the_flag(argv, flag, tmp_path, capsys):
    argv = [a.replace("RUN", str(tmp_path)) for a in argv]
    argv += ["--out", str(tmp_path / "out")] if argv[0] == "train" else []
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error_line(capsys, flag)


def test_set_and_attack_arg_values_are_type_checked_naming_the_field(run_copy, tmp_path, capsys):
    assert main(["defend", "ft", str(run_copy), "--set", "epochs=abc"]) == 2
    _one_error_line(capsys, "FinetuneConfig.epochs must be int, got 'abc'")
    assert main(["train", "--attack-arg", "size=abc", "--out", str(tmp_path / "t")]) == 2
    _one_error_line(capsys, "badnets argument size must be int, got 'abc'")
    assert main(["train", "--attack-arg", "sise=2", "--out", str(tmp_path / "t")]) == 2
    _one_error_line(capsys, "no argument(s) ['sise']")


def test_existing_runs_and_files_as_out_are_refused_without_overwrite(run_copy, tmp_path, capsys):
    before = (run_copy / "variables.npz").read_bytes()
    assert main(["defend", "clp", str(run_copy), "--out", str(run_copy)]) == 2  # its own input
    _one_error_line(capsys, "already holds the run being defended", "--overwrite")
    other = Path(shutil.copytree(run_copy, tmp_path / "other"))
    assert main(["defend", "clp", str(run_copy), "--out", str(other)]) == 2
    _one_error_line(capsys, "already holds a run")
    assert main(["train", "--out", str(run_copy), "--quiet"]) == 2
    _one_error_line(capsys, "already holds a trained run")
    assert (run_copy / "variables.npz").read_bytes() == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv in (["defend", "clp", str(run_copy), "--out", str(a_file)], ["train", "--out", str(a_file), "--quiet"]):
        assert main(argv) == 2
        _one_error_line(capsys, "is not a directory")


def test_missing_files_are_one_line_errors(run_copy, tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.py")]) == 2
    _one_error_line(capsys, "missing.py does not exist")
    assert main(["defend", "cetf+bn-clean", str(run_copy), "--set", f"suspect_file={tmp_path / 'none.npy'}"]) == 2
    _one_error_line(capsys, "suspect_file", "none.npy does not exist")
    with pytest.raises(SystemExit):
        main(["train", "--model", "nope", "--out", str(tmp_path / "t")])
    _one_error_line(capsys, "invalid choice: 'nope'")


def test_a_corrupt_data_file_is_named_with_a_pointer_to_data_verify(run_copy, tmp_path, capsys):
    (tmp_path / "data" / "gtsrb").mkdir(parents=True)
    (tmp_path / "data" / "gtsrb" / "gtsrb32.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main(["eval", str(run_copy), "--data-dir", str(tmp_path / "data")]) == 2
    _one_error_line(capsys, "gtsrb32.npz: truncated or corrupt", "bdjax data verify")


def test_data_verify_checks_sums_and_known_files(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "gtsrb").mkdir(parents=True)
    (root / "gtsrb" / "gtsrb32.npz").write_bytes(b"not the shared file")  # known checksum: fails
    (root / "good.bin").write_bytes(b"good")
    good = hashlib.sha256(b"good").hexdigest()
    (root / "SHA256SUMS").write_text(f"{good}  good.bin\n{good}  ../outside.bin\n{good}  gone.bin\n")
    assert main(["data", "verify", "--data-dir", str(root)]) == 1
    captured = capsys.readouterr()
    lines = sorted(captured.out.splitlines())
    assert [line.split()[:2] for line in lines] == [["FAILED", "gtsrb/gtsrb32.npz:"], ["MISSING", "gone.bin:"],
                                                     ["OK", "good.bin"], ["REFUSED", "../outside.bin:"]]
    assert captured.err.count("\n") == 1 and "3 of 4 file(s)" in captured.err
    assert main(["data", "verify", "--data-dir", str(root), "--sums", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "does not exist")


def test_data_verify_passes_on_the_shared_data(data_dir, capsys):
    assert main(["data", "verify", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "OK       gtsrb/gtsrb32.npz" in out and "match their checksums" in out


def test_defend_overwrite_replaces_its_own_input_with_the_repaired_run(run_copy, data_dir, capsys):
    assert main(["defend", "clp", str(run_copy), "--out", str(run_copy), "--overwrite", "--clean-per-class", "1",
                 "--eval-limit", "200", "--json", "--data-dir", data_dir]) == 0
    repaired = checkpoint.load(run_copy)
    assert repaired.record["defense"]["method"] == "clp" and "record_sha256" in repaired.record
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # nothing left beside it


def test_run_specs_refuse_the_same_values_naming_the_field():
    from bdjax.runs import RunSpec

    for field, value, message in [("learning_rate", float("nan"), "learning_rate must be a finite number"),
                                  ("train_subset", 0, r"train_subset must be >= 1, got 0 \(None, not 0, means all\)"),
                                  ("eval_limit", -3, "eval_limit must be >= 1"),
                                  ("poison_rate", 1.5, r"poison_rate must be in \[0.0, 1.0\]"),
                                  ("target", 43, r"target 43 outside \[0, 43\)")]:
        with pytest.raises(ValueError, match=message):
            RunSpec(dataset="gtsrb", **{field: value})
    with pytest.raises(ValueError, match="given for attack 'none'"):
        RunSpec(attack="none", attack_args={"size": 2})
