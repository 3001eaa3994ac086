"""experiments/device_check.py runs every section on the CPU (``--cpu``, tiny sizes) and
reports finite seconds for each: the script a device run will use works before one is lent.
The defenses, NC, BNA, CETF and the FT sweep run on the committed zoo v2 small-bn BadNets, the
smallest BN model (106 s in the suite on the 2-core AMD CPU, 2026-12-06; 176 s on the medium-bn
test model)."""

import json
import math
from pathlib import Path

import pytest

from conftest import ZOO_V2_DIR

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# realdata: compiled with XLA's optimisations (NC's search over 43 labels runs ~5x slower without).
# heavy: ~100 s in the suite on this CPU, mostly compilation; `make test-heavy` runs it.
pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.heavy]


def test_device_check_writes_every_section_with_finite_seconds(data_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import device_check

    assert device_check.main(["--cpu", "--run", str(ZOO_V2_DIR / "small-bn-gtsrb-badnets"), "--data-dir", data_dir,
                              "--train-models", "small", "--methods", "clp", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert {"date", "device", "jax", "backend"} <= set(report) and report["backend"] == "cpu"
    sections = report["sections"]
    assert set(sections) == {"training", "defenses", "ft_sweep", "bna_pair_search", "nc_all_labels",
                             "cetf_population"}

    def seconds(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from seconds(value)
            elif key.endswith("_s") or key.endswith("_per_s"):
                yield key, value

    for name, section in sections.items():
        found = dict(seconds(section))
        assert found, name
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in found.values()), (name, found)
    assert set(sections["defenses"]) == {"clp"}
    assert sections["training"]["small"]["float32"]["images_per_s"] > 0
    assert sections["training"]["small"]["bfloat16"]["images_per_s"] > 0
    assert sections["ft_sweep"]["settings"] == 2 and sections["nc_all_labels"]["labels"] == 43
    assert (tmp_path / "device_check.md").read_text().startswith("# Device check")
