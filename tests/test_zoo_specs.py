"""experiments/zoo.py: every zoo spec is a valid RunSpec, and issue 27's bar is applied as written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bdjax.runs import RunSpec

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


@pytest.mark.parametrize("variant", sorted(zoo.ZOO_DIRS))
def test_every_variant_builds_valid_specs(variant):
    specs = zoo.variant_specs(variant)
    assert specs and all(isinstance(s, RunSpec) for s in specs.values())
    clean = [s for s in specs.values() if s.attack == "none"]
    assert clean and all(not s.attack_args for s in clean)


def test_v2_trains_resnet20_with_the_default_recipe_and_thesis_models_with_theirs():
    specs = zoo.v2_specs()
    assert specs["resnet20-gtsrb-badnets"].recipe == "default"
    assert specs["resnet20-cifar10-cb"].poison_rate == pytest.approx(900 / 50000)
    assert {s.recipe for n, s in specs.items() if not n.startswith("resnet20")} == {"thesis"}
    assert all(s.train_subset is None for s in specs.values())  # full training splits


def test_bar_follows_issue_27():
    specs = zoo.v2_specs()
    assert zoo.v2_bar(specs["resnet20-gtsrb-badnets"]) == (0.96, 0.95)
    assert zoo.v2_bar(specs["resnet20-gtsrb-wanet"]) == (0.96, 0.90)
    assert zoo.v2_bar(specs["resnet20-cifar10-sig"]) == (0.88, 0.95)
    assert zoo.v2_bar(specs["resnet20-cifar10-badnets-a2a"]) == (0.90, 0.85)
    assert zoo.v2_bar(specs["medium-bn-gtsrb-badnets"]) == (0.92, 0.95)  # thesis table 5.4: 0.95 / 1.00
    assert zoo.v2_bar(specs["small-gtsrb-blended"]) == (0.79, 0.80)
    assert zoo.v2_bar(specs["medium-bn-gtsrb-clean"]) == (0.92, 0.0)
    assert all(zoo.v2_bar(s) is not None for s in specs.values())
    gtsrb = specs["resnet20-gtsrb-badnets"]
    assert zoo._meets(gtsrb, {"acc": 0.97, "asr": 0.99}) == "yes"
    assert zoo._meets(gtsrb, {"acc": 0.95, "asr": 0.5}) == "no: ACC < 0.96, ASR < 0.95"
    assert zoo._meets(specs["resnet20-gtsrb-clean"], {"acc": 0.97, "asr": None}) == "yes"


def test_cpu_epoch_counts_of_slow_planting_attacks_stay_out_of_the_accelerator_zoo():
    v2, accelerator = zoo.v2_specs(), zoo.v2_specs(accelerator=True)
    assert v2["resnet20-gtsrb-wanet"].epochs == 15 and v2["resnet20-gtsrb-input-aware"].epochs == 30
    assert accelerator["preact-resnet18-gtsrb-wanet"].epochs is None
    assert accelerator["preact-resnet18-gtsrb-input-aware"].epochs is None


def test_an_unfinished_training_of_an_older_spec_is_kept_aside_and_the_run_restarts(tmp_path, monkeypatch):
    from bdjax import checkpoint

    name = "resnet20-gtsrb-input-aware"
    stale = tmp_path / name / "training"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    calls = []

    def train_run(spec, run_dir, data_dir, progress, resume, overwrite):
        calls.append(run_dir)
        if (run_dir / "training").exists():
            raise checkpoint.StaleTrainingState("written by another training", run_dir / "training")
        return type("Run", (), {"record": {"metrics": {"acc": 0.97, "asr": 0.99}}})()

    monkeypatch.setattr(zoo, "train_run", train_run)
    monkeypatch.setattr(zoo, "write_table", lambda out, variant: out / "RESULTS.md")
    assert zoo.main(["--only", name, "--out", str(tmp_path)]) == 0
    assert calls == [tmp_path / name] * 2  # refused, then trained from the start
    kept = tmp_path / f"{name}.stale-training"
    assert (kept / "state.json").read_text() == "{}" and not stale.exists()  # nothing lost


# A stand-in for `zoo.py --only NAME --out OUT` in train_concurrently's test: checkpoints two
# epochs as a training does, then exits (name "bad": fails after its first).
_FAKE_TRAINING = '''
import json, sys, time
from pathlib import Path
name, out = sys.argv[sys.argv.index("--only") + 1], Path(sys.argv[sys.argv.index("--out") + 1])
(out / name / "training").mkdir(parents=True)
for epoch in (1, 2):
    (out / name / "training" / "state.json").write_text(json.dumps({"epoch": epoch}))
    time.sleep(0.3)
    if name == "bad":
        print("training diverged"); sys.exit(3)
print(f"[done] {name}")
'''


def test_concurrent_trainings_run_in_order_report_epochs_and_failures(tmp_path, capsys):
    script = tmp_path / "fake_zoo.py"
    script.write_text(_FAKE_TRAINING)
    out = tmp_path / "zoo"
    out.mkdir()
    failed = zoo.train_concurrently(["a", "bad", "c"], 2, out, [], poll=0.1, script=script)
    printed = capsys.readouterr().out
    assert failed == ["bad"]
    assert printed.index("[start] a") < printed.index("[start] c")  # queued in the given order
    # Two at a time: c starts only once a or bad has ended.
    assert printed.index("[start] c") > min(printed.index("[exit] a"), printed.index("[failed] bad"))
    assert "[exit] a: [done] a" in printed and "[exit] c: [done] c" in printed
    assert "[failed] bad (exit 3): training diverged" in printed
    assert zoo.training_epoch(out / "a") == 2 and zoo.training_epoch(out / "missing") is None
    assert (out / "c.log").read_text().strip() == "[done] c"


def test_jobs_must_be_positive():
    with pytest.raises(SystemExit):
        zoo.main(["--jobs", "0", "--table-only"])
