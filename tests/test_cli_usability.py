"""A new user's first hour: help without waiting for JAX, a list of the methods, a defense that
says what it found (and when it changed nothing), progress that never spoils ``--json``."""

import json
import os
import subprocess
import sys

import pytest

from bdjax import catalog
from bdjax.cli import main


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.parametrize("argv", [["--help"], ["defend", "--help"], ["defend", "nope", "run"],
                                  ["train", "--model", "resnet21", "--out", "x"]])
def test_help_and_argument_errors_answer_without_importing_jax(argv):
    result = _python("import sys\nfrom bdjax.cli import main\n"
                     f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                     "print('JAX IMPORTED' if 'jax' in sys.modules else 'no jax')")
    assert result.stdout.strip().endswith("no jax"), result.stderr


def test_the_catalogue_names_every_registered_model_attack_recipe_and_defense():
    from bdjax.attacks import ATTACKS
    from bdjax.defenses import DEFENSES
    from bdjax.models import MODEL_NAMES
    from bdjax.recipes import RECIPES
    assert catalog.MODEL_NAMES == MODEL_NAMES
    assert sorted(catalog.ATTACK_NAMES) == sorted(ATTACKS)
    assert sorted(catalog.RECIPE_NAMES) == sorted(RECIPES)
    assert sorted(catalog.DEFENSE_NAMES) == sorted(DEFENSES)


def test_methods_lists_every_defense_with_kind_paper_summary_and_fields(capsys):
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert sorted(methods) == sorted(catalog.DEFENSE_NAMES)
    assert all(m["kind"] and m["paper"] and m["summary"] for m in methods.values())
    assert methods["clp"]["fields"] == [{"name": "u", "type": "float", "default": 3.0}]
    assert {"name": "finetune.epochs", "type": "int", "default": 20} in methods["fp"]["fields"]
    assert main(["methods"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in catalog.DEFENSE_NAMES) and "input filter" in table


def test_defend_method_help_shows_that_methods_fields_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["defend", "suspicion", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "mu" in text and "3.5" in text and "Hashemifar" in text


@pytest.mark.realdata
def test_a_defense_that_changes_nothing_says_so_and_json_stays_one_object_with_progress_on(
        gtsrb_badnets_dir, data_dir, capsys):
    # CLP at the paper's u = 3 prunes no channel of this model.
    argv = ["defend", "clp", str(gtsrb_badnets_dir), "--eval-limit", "300", "--data-dir", data_dir]
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["found"] == {"channels_pruned": 0, "layers_pruned": 0}
    assert report["no_op"] and report["changed"]["values"] == 0 and report["der"] == 0.5
    assert "defending with clp" in captured.err and "ETA" not in captured.out
    assert main(argv + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "NO CHANGE" in captured.out and "0 channels pruned" in captured.out and captured.err == ""


@pytest.mark.realdata
def test_pruning_reports_how_many_channels_it_pruned(gtsrb_badnets_dir, data_dir, capsys):
    argv = ["defend", "clp", str(gtsrb_badnets_dir), "--eval-limit", "300", "--set", "u=1.5", "--json",
            "--quiet", "--data-dir", data_dir]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["found"]["channels_pruned"] > 0 and not report["no_op"] and report["changed"]["values"] > 0


@pytest.mark.realdata
def test_the_second_run_reads_compiled_programs_from_the_persistent_cache(gtsrb_badnets_dir, data_dir, tmp_path):
    cache = tmp_path / "cache"
    command = ("import sys\nfrom bdjax.cli import main\n"
               f"sys.exit(main(['--compilation-cache', {str(cache)!r}, 'defend', 'clp', "
               f"{str(gtsrb_badnets_dir)!r}, '--eval-limit', '100', '--quiet', '--data-dir', {data_dir!r}]))")
    assert _python(command).returncode == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was cached"
    assert _python(command).returncode == 0
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new to compile
    off = _python(command.replace(repr(str(cache)), "'off'"), BDJAX_COMPILATION_CACHE="")
    assert off.returncode == 0, off.stderr


def test_a_long_loop_reports_its_progress_with_an_eta_and_a_short_one_says_nothing(caplog, monkeypatch):
    from bdjax import progress
    clock = iter([0.0, 1.0, 2.0, 15.0, 16.0, 30.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO", logger="bdjax"):
        steps = progress.Steps("search", 4)  # starts at t = 0
        for _ in range(4):
            steps.done()  # t = 1, 2, 15 (reports), 16 (the last: reports)
    assert [r.getMessage() for r in caplog.records] == ["search 3/4, 15 s, ETA 5 s", "search 4/4, 16 s, ETA 0 s"]
    caplog.clear()
    with caplog.at_level("INFO", logger="bdjax"):
        short = progress.Steps("short", 2)  # t = 30
        monkeypatch.setattr(progress.time, "perf_counter", lambda: 31.0)
        short.done()
        short.done()
    assert caplog.records == []
