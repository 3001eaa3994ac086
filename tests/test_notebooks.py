"""The notebooks run top to bottom (nbclient), on the committed zoo models of the defense tests
(conftest's ZOO_BADNETS_DIR and ZOO_CLEAN_DIR; no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ZOO_BADNETS_DIR, ZOO_CLEAN_DIR

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    import nbformat

    assert len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.realdata
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, zoo_badnets_run, zoo_clean_run, data_dir, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("BDJAX_DATA_DIR", data_dir)
    monkeypatch.setenv("BDJAX_NOTEBOOK_RUN", str(ZOO_BADNETS_DIR))
    monkeypatch.setenv("BDJAX_NOTEBOOK_CLEAN_RUN", str(ZOO_CLEAN_DIR))
    monkeypatch.setenv("BDJAX_NOTEBOOK_EVAL_LIMIT", "500")
    monkeypatch.setenv("BDJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert not (tmp_path / "runs").exists()  # the zoo models were used, nothing was trained
