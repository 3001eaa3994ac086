"""experiments/results_book.py's verdict follows SPEC.md's reproduction rule as written; its
diagnosis reads the records; the records (experiments/tables.py) survive two writers."""

import json
import types
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def book(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import results_book
    return results_book


@pytest.mark.parametrize("asr, cost, expected", [
    (0.07, 0.045, "reproduced"),   # ASR paper + 5, cost paper + 3: the edges are in
    (0.08, 0.015, "near"),         # ASR 6 points above the paper's
    (0.02, 0.05, "near"),          # cost 3.5 points above the paper's
    (0.17, 0.115, "near"),         # both at the near edges (15 / 10)
    (0.18, 0.015, "not"),
    (0.02, 0.12, "not"),
])
def test_verdict_uses_specs_bounds(book, asr, cost, expected):
    assert book.verdict(asr, cost, paper_asr=0.02, paper_cost=0.015) == expected


def test_a_row_far_below_the_papers_asr_is_flagged_and_a_destroyed_model_is_not_called_stronger(book):
    assert book.verdict(0.0, 0.01, paper_asr=0.25, paper_cost=0.015) == "reproduced (stronger)"
    assert book.verdict(0.0, 0.96, paper_asr=0.25, paper_cost=0.015) == "not (backdoor gone with the model)"
    assert book.verdict(0.06, 0.01, paper_asr=0.25, paper_cost=0.015) == "reproduced"  # 19 points below
    # An attack that did not plant (CIFAR-10 CB at 2/255: undefended ASR 0.02) compares nothing.
    assert book.verdict(0.02, 0.0, paper_asr=0.013, paper_cost=0.006, undefended_asr=0.02) == "no backdoor to remove"


def test_the_diagnosis_reads_the_stored_records_and_names_the_missing_ones(book, monkeypatch, tmp_path):
    import diagnosis

    text = diagnosis.section()
    assert text.startswith("## Diagnosis") and "**FT on GTSRB BadNets" in text and "**CETF clean false positives" in text
    assert "**TAC on zoo v2" in text and "**Suspiciousness pruning" in text
    assert "**ANP with 10 clean CIFAR-10 images" in text and "**BNA on all-to-all BadNets" in text
    assert "**BNA on SP" in text
    assert "**Februus" in text and "**CETF's repairs" in text
    monkeypatch.setattr(diagnosis, "RESULTS", tmp_path)  # no records: each paragraph names its command
    empty = diagnosis.section()
    assert empty.count("Record missing") + empty.count("Records missing") == 11
    assert "tsbd_tables.py" in empty and "repair_tables.py" in empty and "tac_tables.py" in empty
    assert "suspicion_diagnosis.py" in empty and "bna_tables_v2.py" in empty and "filter_tables.py" in empty


def test_tsbd_paper_rows_agree_with_their_own_der(monkeypatch):
    """Each transcribed row of the TSBD slides' Table 1: DER = [ΔASR − max(0, ΔACC) + 100] / 2 (%)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import tsbd_tables

    for (attack, method), (acc, asr, der) in tsbd_tables.PAPER.items():
        if der is None:
            continue
        acc0, asr0, _ = tsbd_tables.PAPER[attack, "none"]
        expected = (max(0.0, asr0 - asr) - max(0.0, acc0 - acc) + 100) / 2
        assert abs(expected - der) < 0.05, (attack, method, expected, der)  # the slides round


def test_tsbd_table_methods_are_registered_defenses_with_valid_overrides(monkeypatch):
    """Each row label of the TSBD table names a registered defense, and its overrides are fields of that
    defense's config (a typo would otherwise surface hours into a run)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import tsbd_tables
    from bdjax import defenses

    for label, (registered, overrides) in tsbd_tables.METHODS.items():
        spec = defenses.get(registered)
        defenses.make_config(spec.config_cls, overrides)
        if label in ("nad", "nc", "anp", "clp", "ibau"):
            assert any(method == label for _, method in tsbd_tables.PAPER), label


def test_tsbd_clean_set_share_is_of_the_training_split_as_backdoorbench_ratio(monkeypatch):
    """The slides' 5% clean data is BackdoorBench's ratio of the training split: 2,500 CIFAR-10 images
    match it, the 500 of k = 50 (5% of the test split) are 1% and say so in the summary's setting."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import tsbd_tables

    cell = {"dataset": "cifar10", "attack": "badnets", "method": "tsbd"}
    assert tsbd_tables.paper_reference({**cell, "defense_size": 2500})["setting_note"] is None
    note = tsbd_tables.paper_reference({**cell, "defense_size": 500})["setting_note"]
    assert "1.0% of train" in note and "5%" in note
    assert "1.6% of train" in tsbd_tables.paper_reference({**cell, "dataset": "gtsrb", "defense_size": 645})[
        "setting_note"]


def test_two_writers_of_one_cell_record_keep_each_others_cells(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import tables

    path = tmp_path / "record.json"
    first, second = tables.CellRecord(path, {"a": 1}), tables.CellRecord(path, {"a": 1})  # both read an empty record
    first.add({"run": "x", "seed": 0, "acc": 0.5})
    second.add({"run": "x", "seed": 1, "acc": np.float32(0.25)})
    first.add({"run": "x", "seed": 2, "acc": 0.75})
    stored = json.loads(path.read_text())["cells"]
    assert [(c["seed"], c["acc"]) for c in stored] == [(0, 0.5), (1, 0.25), (2, 0.75)]
    assert tables.CellRecord(path, {"a": 1}).find(seed=1)["acc"] == 0.25
    # Both compute the same undefended cell (each checked before the other saved it): kept once.
    first.add({"run": "x", "seed": 3, "method": "none", "acc": 0.5, "seconds": 0.0})
    second.add({"run": "x", "seed": 3, "method": "none", "acc": 0.5, "seconds": 0.1})
    assert len([c for c in json.loads(path.read_text())["cells"] if c["seed"] == 3]) == 1


def test_the_summary_reads_tac_v2_cells_against_the_thesis_and_names_a_different_architecture(book, monkeypatch,
                                                                                                 tmp_path):
    """Table 5.4's TAC row for small-bn BadNets: ACC 0.90 → 0.47, ASR 1.00 → 0.32 (drops 0.43 / 0.68);
    ResNet-20 is compared with the thesis's ResNet-18 and the setting column says so."""
    import tac_tables
    cell = dict(run="small-bn-gtsrb-badnets", model="small-bn", attack="badnets", dataset="gtsrb", k=1, seed=0)
    ref = tac_tables.paper_reference({**cell, "method": "tac"})
    assert ref["acc_before"] == 0.90 and abs(ref["acc"] - 0.47) < 1e-9 and abs(ref["asr"] - 0.32) < 1e-9
    assert tac_tables.paper_reference({**cell, "method": "tac_oracle"}) is None
    resnet = dict(cell, run="resnet20-gtsrb-badnets", model="resnet20")
    cells = [dict(c, seed=s, method=m, acc=a, asr=r) for s in (0, 1, 2) for c in (cell, resnet)
             for m, a, r in (("none", 0.93, 1.0), ("tac", 0.92, 0.01))]
    (tmp_path / "tac_tables_v2.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(book, "RESULTS", tmp_path)
    rows = [line for line in book.measured_summary().splitlines() if line.startswith("| tac |")]
    assert len(rows) == 2
    small, big = (next(r for r in rows if name in r) for name in ("small-bn-gtsrb", "resnet20-gtsrb"))
    assert "| same |" in small and "| reproduced (stronger) |" in small and "| 3 | yes |" in small
    assert "paper: gtsrb resnet18" in big


def test_the_summary_reads_the_input_filter_cells_of_the_cetf_papers_setting_only(book, monkeypatch, tmp_path):
    """Tables II / III: CETF keeps ACC 99.97 with ASR 0 on GTSRB ResNet-20 BadNets (bottom-right); a
    filter that rejects every clean input has ACC 0 and is "not" reproduced; our region-limit
    ablation and the other zoo models have no paper row."""
    import filter_tables
    cell = dict(run="resnet20-gtsrb-badnets-br", model="resnet20", attack="badnets", dataset="gtsrb", k=2)
    assert filter_tables.paper_reference({**cell, "method": "cetf"})["acc"] == 0.9997
    assert filter_tables.paper_reference({**cell, "method": "cetf-region-limit"}) is None
    assert filter_tables.paper_reference({**cell, "run": "resnet20-gtsrb-badnets", "method": "cetf"}) is None
    cells = [dict(cell, seed=s, method=m, acc=a, asr=r, tpr=t, fpr=f)
             for s in (0, 1, 2) for m, a, r, t, f in (("none", 0.97, 1.0, 0.0, 0.0), ("cetf", 0.0, 0.0, 1.0, 1.0),
                                                      ("cetf-region-limit", 0.9, 0.0, 1.0, 0.05))]
    (tmp_path / "cetf_tables_v2.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(book, "RESULTS", tmp_path)
    rows = [line for line in book.measured_summary().splitlines() if "resnet20-gtsrb-badnets-br" in line]
    assert len(rows) == 1 and rows[0].startswith("| cetf |") and "| not |" in rows[0] and "| same |" in rows[0]


def test_the_filter_tables_cetf_screening_resumes_after_a_kill_with_the_uninterrupted_result(book, monkeypatch,
                                                                                          tmp_path):
    import filter_tables
    import jax

    from bdjax.defenses import cetf

    calls = []

    def fake_screen(module, variables, images, auxiliary, filter_images, key, config):
        calls.append(len(images))
        if fail and len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third chunk
        n, first = len(images), images[:, 0, 0, 0].astype(np.int32)
        return cetf.Screening(first % 2 == 0, first, np.tile(first[:, None], 4), first * 1.0,
                              np.full(n, float(jax.random.randint(key, (), 0, 100))), np.zeros((n, 4), np.int32),
                              np.zeros((n, 3)), np.ones(n, np.int32))

    monkeypatch.setattr(cetf, "screen", fake_screen)
    run = types.SimpleNamespace(module=None, variables=None)
    images = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((8, 2, 2, 3), np.uint8)
    fail = False
    whole = filter_tables.resumable_screen(run, images, None, None, jax.random.key(0), None, tmp_path / "a.npz", 3)
    assert calls == [3, 3, 2]
    calls.clear()
    fail = True
    with pytest.raises(KeyboardInterrupt):
        filter_tables.resumable_screen(run, images, None, None, jax.random.key(0), None, tmp_path / "b.npz", 3)
    fail = False
    calls.clear()
    resumed = filter_tables.resumable_screen(run, images, None, None, jax.random.key(0), None, tmp_path / "b.npz", 3)
    assert calls == [2]  # only the chunk that the kill interrupted
    for name in ("poisoned", "predicted", "box", "switched"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))


def test_the_defense_benchmark_table_prints_its_note_apart_from_the_command(book, tmp_path):
    import defense_benchmark

    argv = ["--budget", "quick", "--note", "beside a zoo run", "--note=x", "--seed", "1"]
    assert defense_benchmark.shown_arguments(argv) == ["--budget", "quick", "--seed", "1"]
    header = {"command": "python experiments/defense_benchmark.py", "machine": "cpu", "run": "r", "defense_size": 430,
              "per_class": 10, "eval_size": 1000, "filter_eval": "20 clean + 19 triggered", "before": "ACC 97.6 %",
              "budget": "quick", "note": "Measured beside another job."}
    record = {"method": "ft", "after": {"acc": 0.9, "asr": 0.1}, "overrides": {}, "defense_seconds": 1.0}
    defense_benchmark.write_table(tmp_path / "t.md", [record], header)
    text = (tmp_path / "t.md").read_text()
    assert "\nMeasured beside another job.\n" in text
    assert "| ft | 430 | — | 1.0 | – | 90.0 | 10.0 | – | – |" in text
    defense_benchmark.save(tmp_path / "r.json", "r", "quick", None, {"ft": record})
    assert "note" not in json.loads((tmp_path / "r.json").read_text())


def test_the_bna_v2_table_cites_table_1_or_3_by_the_defense_set_and_the_summary_skips_the_clean_model(
        book, monkeypatch, tmp_path):
    """BNA on CIFAR-10 BadNet A2O: table 1 (100 clean images per class, 1,000 images) gives ACC 0.9032 /
    ASR 0.0139, table 3 (10 per class) 0.9026 / 0.0185, both against the undefended 0.9122; the
    all-to-all row is table 1's A2A column; a clean model (no ASR) has no summary row."""
    import bna_tables_v2
    cell = dict(run="resnet20-cifar10-badnets", model="resnet20", attack="badnets", dataset="cifar10",
                target_mode="all_to_one", method="bna")
    table1 = bna_tables_v2.paper_reference({**cell, "defense_size": 1000, "k": 100})
    table3 = bna_tables_v2.paper_reference({**cell, "defense_size": 100, "k": 10})
    assert (table1["acc"], table1["asr"], table1["acc_before"]) == (0.9032, 0.0139, 0.9122)
    assert (table3["acc"], table3["asr"]) == (0.9026, 0.0185) and "table 3" in table3["source"]
    a2a = bna_tables_v2.paper_reference({**cell, "run": "resnet20-cifar10-badnets-a2a", "target_mode": "all_to_all",
                                         "defense_size": 1000, "k": 100})
    assert (a2a["acc"], a2a["asr"]) == (0.8951, 0.0189)
    clean = dict(cell, run="resnet20-cifar10-clean", attack="none", defense_size=1000, k=100)
    assert bna_tables_v2.paper_reference(clean) is None
    cells = [dict(c, seed=s, method=m, acc=a, asr=None if c is clean else r, defense_size=1000, k=100)
             for s in (0, 1, 2) for c in (cell, clean) for m, a, r in (("none", 0.86, 1.0), ("bna", 0.85, 0.02))]
    (tmp_path / "bna_tables_v2.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(book, "RESULTS", tmp_path)
    rows = [line for line in book.measured_summary().splitlines() if line.startswith("| bna |")]
    assert len(rows) == 1 and "resnet20-cifar10-badnets (cifar10), k = 100" in rows[0]
    assert "| reproduced |" in rows[0] and "paper: cifar10 resnet18" in rows[0]


def test_bna_v2_table_on_gtsrb_names_its_dataset_and_keeps_a_source_subset_apart_from_the_paper(book, tmp_path):
    """A search from a few source classes (the GTSRB cost cut) is its own row, with no paper numbers beside it."""
    import bna_tables_v2
    import tables
    assert bna_tables_v2.bna_label(None) == "bna" and bna_tables_v2.bna_label([1, 2, 3]) == "bna-sources-1-2-3"
    cell = dict(run="resnet20-gtsrb-badnets", model="resnet20", attack="badnets", dataset="gtsrb", k=10,
                defense_size=430, eval_size=12200, target_mode="all_to_one", seed=0, seconds=1.0)
    cells = [dict(cell, method="none", acc=0.97, asr=1.0),
             dict(cell, method="bna-sources-1-2-3", acc=0.96, asr=0.0, sia=0.9, targets=[14],
                  tpr=1.0, fpr_target=0.1, fpr_all=0.01),
             dict(cell, method="nc", acc=0.97, asr=0.01, info={"infected": [14]}),
             dict(cell, method="nc", seed=1, acc=0.97, asr=1.0, info={})]
    (tmp_path / "r.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    text = bna_tables_v2.markdown(tables.CellRecord(tmp_path / "r.json", {}), "cmd")
    assert text.startswith("# BNA's tables 1 / 3 / 9 on zoo v2 (GTSRB ResNet-20)")
    row = next(line for line in text.splitlines() if "| bna-sources-1-2-3 |" in line)
    assert "targets [14]" in row and row.endswith("|  |")  # detector shown, paper column empty
    assert bna_tables_v2.paper_reference(cells[1]) is None  # GTSRB BadNet's t.5 row is the full search's
    assert "| flagged [14], ? |" in next(line for line in text.splitlines() if "| nc |" in line)


def test_februus_generator_ablation_keeps_out_of_the_main_filter_record_and_says_so(book, tmp_path, capsys):
    """Februus with a generator trained on the training split is an ablation: refused in the paper-table
    record, and its own record's table says what changed."""
    import filter_tables
    import tables
    with pytest.raises(SystemExit):
        filter_tables.main(["--februus-train-images", "100", "--table-only"])
    assert "its own --record" in capsys.readouterr().err
    settings = {"inputs": 200, "calibration_size": 10, "per_class": 2, "februus_train_images": 100}
    cell = dict(run="resnet20-gtsrb-badnets-inner", method="februus", k=2, seed=0, acc=0.5, asr=0.0, tpr=0.0,
                fpr=0.0, der=0.75, info={})
    (tmp_path / "abl.json").write_text(json.dumps({"settings": settings, "cells": [cell]}))
    text = filter_tables.markdown(tables.CellRecord(tmp_path / "abl.json", settings), "cmd")
    assert "trained once on 100 clean images of the training split" in text and "from `abl.json`" in text


def test_sections_sharing_a_title_name_their_records(book, tmp_path):
    """Ablation records written by a table's own script share its title; the book's headings tell them apart."""
    for name, title in (("tsbd_tables", "TSBD"), ("tsbd_ablation", "TSBD"), ("tac_tables", "TAC")):
        (tmp_path / f"{name}.md").write_text(f"# {title}\n\nbody of {name}\n")
    texts = book.sections([tmp_path / f"{n}.md" for n in ("tsbd_tables", "tsbd_ablation", "tac_tables")])
    assert [t.split("\n")[0] for t in texts] == ["## TSBD — record `tsbd_tables`", "## TSBD — record `tsbd_ablation`",
                                                  "## TAC"]
    assert texts[1].endswith("body of tsbd_ablation")


def test_cell_info_keeps_short_integer_lists_such_as_the_labels_nc_flags(book):
    import tables
    info = {"infected": [np.int64(14)], "none_flagged": [], "norms": [1.5, 2.0], "pruned": list(range(100)),
            "count": np.int32(3), "nan": float("nan")}
    assert tables.scalars(info) == {"infected": [14], "none_flagged": [], "count": 3}


def test_the_suspicion_ablation_table_averages_the_seeds_of_a_cell_and_keeps_one_seed_as_it_was(book):
    from suspicion_sweep import ablation_table
    rows = [dict(model="m", method="none", asr=1.0, acc=0.9)]
    rows += [dict(model="m", method="suspicion", heuristic="score", mu=3.0, asr=asr, acc=acc, pruned=pruned)
             for asr, acc, pruned in [(0.5, 0.8, 2), (0.3, 0.7, 3)]]
    rows += [dict(model="m", method="suspicion", heuristic="spectral", mu=2.0, asr=0.0, acc=0.1, pruned=50)]
    table = ablation_table(rows)
    assert "| score | 40.0 ± 14.1 / 75.0 ± 7.1 (2.5) | – |" in table  # two seeds; no μ = 2 row measured
    assert "| spectral | – | 0.0 / 10.0 (50) |" in table
    assert "(no defense: ASR 100.00 / ACC 90.00 %)" in table


def test_the_summary_reads_the_repair_cells_against_tables_vii_viii_and_fig_9_text_only(book, monkeypatch, tmp_path):
    """Tables VII / VIII (attack's samples, k = 2) and Fig. 9's stated values (CETF's triggers) give paper
    rows; the attack-trigger oracle on BadNets and other k have none, so they stay out of the summary."""
    import repair_tables
    blended = dict(run="resnet20-gtsrb-blended", model="resnet20", attack="blended", dataset="gtsrb", k=2)
    paper = repair_tables.paper_reference({**blended, "method": "attack+bn-clean"})
    assert (paper["acc_before"], paper["acc"], paper["asr"]) == (0.9933, 0.9301, 0.011)
    assert repair_tables.paper_reference({**blended, "k": 3, "method": "attack+bn-clean"}) is None
    badnets = dict(run=repair_tables.FIG9_RUN, model="resnet20", attack="badnets", dataset="gtsrb", k=1)
    assert repair_tables.paper_reference({**badnets, "method": "cetf+bn-clean"})["asr"] == 0.0026
    assert repair_tables.paper_reference({**badnets, "k": 2, "method": "cetf+bn-clean"}) is None
    assert repair_tables.paper_reference({**badnets, "method": "attack+bn-unlearn"}) is None
    cells = [dict(blended, seed=s, method=m, acc=a, asr=r, der=None, seconds=1.0, info={})
             for s in (0, 1, 2) for m, a, r in (("none", 0.976, 1.0), ("attack+bn-unlearn", 0.970, 0.6),
                                                ("attack+unlearn", 0.75, 0.3))]
    (tmp_path / "repair_tables.json").write_text(json.dumps({"settings": {"suspects": 4}, "cells": cells}))
    monkeypatch.setattr(book, "RESULTS", tmp_path)
    rows = [line for line in book.measured_summary().splitlines() if "resnet20-gtsrb-blended" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| attack+bn-unlearn", "| attack+unlearn"]
    assert all("| not |" in r and "| same; paper's k not stated, its default 2 |" in r for r in rows)
    table = repair_tables.markdown(types.SimpleNamespace(cells=cells, settings={"suspects": 4},
                                                         path=tmp_path / "repair_tables.json"), "cmd")
    assert "| resnet20-gtsrb-blended | none | – | 97.60 ± 0.00 (n=3) | 100.00 ± 0.00 |" in table
    assert "| 99.33 / – |" in table and "99.77 / 0.00" in table


def test_table_iv_population_rows_show_the_asr_left_beside_the_paper_and_stay_out_of_the_summary(book, monkeypatch,
                                                                                                 tmp_path):
    """A ``cetf-popP`` cell measures only the triggered inputs (ACC / FPR / DER None): its table row says
    so with dashes, gives Table IV's ASR beside it, and the summary (which needs an ACC cost) skips it."""
    import filter_tables
    cell = dict(run="resnet20-gtsrb-badnets-br", model="resnet20", attack="badnets", dataset="gtsrb", k=2,
                triggered_size=200, eval_size=200, seconds=1.0)
    cells = [dict(cell, seed=s, method="none", acc=0.97, asr=1.0, tpr=0.0, fpr=0.0, der=None, info={}) for s in (0, 1)]
    cells += [dict(cell, seed=s, method="cetf-pop10", acc=None, asr=a, tpr=1 - a, fpr=None, der=None,
                   info={"population": 10, "per_input_s": 5.0}) for s, a in ((0, 0.04), (1, 0.06))]
    record = types.SimpleNamespace(cells=cells, settings={"inputs": 200, "calibration_size": 10, "per_class": 2},
                                   path=tmp_path / "cetf_tables_v2.json")
    table = filter_tables.markdown(record, "cmd")
    assert ("| resnet20-gtsrb-badnets-br | cetf-pop10 | – | 5.00 ± 1.41 (n=2) | 95.00 ± 1.41 | – | – | 5.00 | "
            "– / 15.49 (t. IV) |") in table
    (tmp_path / "cetf_tables_v2.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(book, "RESULTS", tmp_path)
    assert "cetf-pop10" not in book.measured_summary()


def test_cetf_search_geometry_measures_found_and_prior_regions_against_the_trigger_and_the_diagnosis_reads_it(
        book, monkeypatch, tmp_path):
    """Regions are (top, left, height, width), priors (top, left, bottom, right) with exclusive ends;
    a region touches the trigger with one of its pixels and covers it with all. The CETF paragraph
    reads Table IV's cells and the geometry record, and names the geometry script when it is missing."""
    import cetf_search_geometry
    import diagnosis

    trigger = np.zeros((32, 32), bool)
    trigger[30:, 30:] = True  # the 2x2 bottom-right patch
    boxes = np.array([[29, 29, 3, 3],    # covers
                      [31, 28, 1, 3],    # touches one pixel (row 31, col 30)
                      [28, 26, 2, 4]])   # rows 28-29: misses
    priors = np.array([[17, 17, 32, 32], [17, 17, 32, 31], [0, 0, 16, 16]])  # contains, stops a column short, away
    found = cetf_search_geometry.geometry(boxes, priors, trigger)
    assert found["box_touches_trigger"] == pytest.approx(2 / 3) and found["box_covers_trigger"] == pytest.approx(1 / 3)
    assert found["box_area_median"] == 8 and found["prior_area_median"] == 15 * 15  # of 225, 210, 256
    assert found["prior_covers_trigger"] == pytest.approx(1 / 3)

    cell = dict(run="resnet20-gtsrb-badnets-br", model="resnet20", attack="badnets", dataset="gtsrb", k=2,
                triggered_size=200, eval_size=200, seconds=1.0, acc=None, fpr=None, der=None)
    cells = [dict(cell, seed=s, method="cetf-pop10", asr=0.0, tpr=1.0, info={"population": 10}) for s in (0, 1)]
    cells.append(dict(cell, seed=0, method="cetf", acc=0.02, asr=0.0, tpr=1.0, fpr=0.97,
                      info={"median_area_triggered": 15.0, "median_area_clean": 208.0}))
    (tmp_path / "cetf_tables_v2.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(diagnosis, "RESULTS", tmp_path)
    assert "P = 10: 0.00 ± 0.00 (n=2) (paper 15.49)" in diagnosis.cetf()
    assert "cetf_search_geometry.py" in diagnosis.cetf()
    geometry = [dict(run=cell["run"], seed=s, population=p, inputs="triggered", n=200, flagged=1.0,
                     box_touches_trigger=1.0, box_covers_trigger=0.9, box_area_median=20.0, prior_area_median=225.0,
                     prior_covers_trigger=1.0) for s in (0, 1) for p in (10, 40)]
    (tmp_path / "cetf_search_geometry.json").write_text(json.dumps({"settings": {}, "cells": geometry}))
    text = diagnosis.cetf()
    assert "contains the whole trigger on 100.0 ± 0.0 % of the triggered inputs (median 225 px of 1024)" in text
    assert "100.0 ± 0.0 % at P = 10, 100.0 ± 0.0 % at P = 40" in text and "15.49 % at P = 10" in text
    assert "already located the trigger" in text
    for c in geometry:
        c["prior_covers_trigger"] = 0.5  # priors that miss the trigger half the time: no such conclusion
    (tmp_path / "cetf_search_geometry.json").write_text(json.dumps({"settings": {}, "cells": geometry}))
    assert "already located" not in diagnosis.cetf() and "50.0 ± 0.0 % of the triggered inputs" in diagnosis.cetf()


def test_the_suspicion_diagnosis_reads_the_ablation_frontier_per_model_and_says_it_is_an_ablation(
        book, monkeypatch, tmp_path):
    """The largest μ whose mean ASR over seeds is below 20%, with its ACC cost against each seed's own
    undefended model; a model no μ cleans is said so."""
    import diagnosis

    def cell(run, seed, method, mu=None, acc=0.86, asr=1.0, pruned=0):
        return dict(run=run, attack=run.split("-")[-1], seed=seed, method=method, heuristic=mu and "score", mu=mu,
                    acc=acc, asr=asr, pruned=pruned)

    cells = []
    for seed in (0, 1):
        cells += [cell("m-badnets", seed, "none", acc=0.86 + 0.01 * seed),
                  cell("m-badnets", seed, "suspicion", 3.0, acc=0.80, asr=0.5, pruned=5),
                  cell("m-badnets", seed, "suspicion", 2.0, acc=0.60, asr=0.1 + 0.04 * seed, pruned=30),
                  cell("m-badnets", seed, "suspicion", 1.0, acc=0.20, asr=0.0, pruned=100),
                  dict(cell("m-badnets", seed, "suspicion", 3.0, acc=0.80, asr=0.05), heuristic="spectral"),
                  cell("m-trojan", seed, "none"), cell("m-trojan", seed, "suspicion", 2.0, asr=0.9)]
    # seed 2 is still being measured (two of its cells so far): left out, not counted as a third seed
    cells += [cell("m-badnets", 2, "none"), cell("m-badnets", 2, "suspicion", 3.0, acc=0.85, asr=0.0, pruned=5)]
    (tmp_path / "suspicion_ablation.json").write_text(json.dumps({"settings": {}, "cells": cells}))
    monkeypatch.setattr(diagnosis, "RESULTS", tmp_path)
    text = diagnosis._suspicion_ablation()
    assert "an ablation, not a setting" in text
    assert "m-badnets (2 seeds): μ = 2, 30 channels, ASR 12.0 ± 2.8 at 26.5 ± 0.7 ACC points; paper 1.27 at ACC 89.23" in text
    assert "m-trojan (2 seeds): no μ down to 2 takes ASR below 20%; paper 4.67 at ACC 86.19" in text
    assert "costs eq. 6 over 10 ACC points on every model" in text
    assert "(spectral alone: μ = 3, ASR 5.0 ± 0.0 at 6.5 ACC points)" in text  # cheaper than eq. 6 there
    assert "within 10 points on m-badnets (spectral; the paper's spectral alone: ASR 7.15 at ACC 86.6)" in text
    monkeypatch.setattr(diagnosis, "RESULTS", tmp_path / "none")
    assert "not run yet" in diagnosis._suspicion_ablation()
