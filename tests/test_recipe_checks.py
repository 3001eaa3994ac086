"""experiments/recipe_checks.py: its table from the committed records, clean models included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "recipe_checks.py"
_spec = importlib.util.spec_from_file_location("recipe_checks", _PATH)
recipe_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_checks)


def test_checks_set_batch_and_rate_of_the_recipe_they_override():
    fields = recipe_checks._config_fields(recipe_checks.CHECKS["r20-cifar10-clean-100ep-b256"])
    assert fields == {"model": "resnet20", "batch_size": 256, "learning_rate": 0.2}
    # A check without overrides takes the default recipe's (batch 64, peak rate 0.05).
    assert recipe_checks._config_fields(recipe_checks.CHECKS["r20-gtsrb-12k-3ep"]) == {
        "model": "resnet20", "batch_size": 64, "learning_rate": 0.05}


def test_table_without_data_reads_clean_and_backdoored_records(tmp_path, monkeypatch):
    if not (recipe_checks.COMMITTED / "r20-cifar10-clean-40ep-b256" / "record.json").is_file():
        pytest.skip("the committed recipe-check models are not in this checkout")
    monkeypatch.setattr(recipe_checks, "RESULTS", tmp_path)
    path = recipe_checks.write_table(tmp_path / "no-runs", data_dir=None)
    rows = {r["run"]: r for r in json.loads((tmp_path / "recipe_checks.json").read_text())}
    clean = rows["recipe-checks/r20-cifar10-clean-40ep-b256"]
    assert clean["asr"] is None and clean["errors_to_target"] is None
    assert clean["batch_size"] == 256 and clean["backend"] == "gpu" and clean["model"] == "resnet20"
    assert rows["zoo-v2/resnet20-cifar10-badnets"]["asr"] > 0.9
    line = next(li for li in path.read_text().splitlines() if li.startswith("| recipe-checks/r20-cifar10-clean-40ep"))
    assert "| – |" in line  # no ASR, no target share: a dash, not a crash or a number


def test_a_bare_run_trains_no_accelerator_check_and_no_committed_one(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(recipe_checks, "train_run", lambda spec, out, *a, **k: trained.append(out.name))
    monkeypatch.setattr(recipe_checks, "write_table", lambda out, data_dir=None: tmp_path / "table.md")
    assert recipe_checks.main(["--out", str(tmp_path)]) == 0
    assert trained == [n for n in recipe_checks.CHECKS if "-gtsrb-" in n]
    trained.clear()
    assert recipe_checks.main(["--out", str(tmp_path), "--only", "p18-cifar10-clean-40ep-b256"]) == 0
    assert trained == ["p18-cifar10-clean-40ep-b256"]
    if (recipe_checks.COMMITTED / "r20-cifar10-clean-40ep-b256" / "record.json").is_file():
        trained.clear()
        recipe_checks.main(["--out", str(tmp_path), "--only", "r20-cifar10-clean-40ep-b256"])
        assert trained == []
