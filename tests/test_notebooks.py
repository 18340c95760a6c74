"""Every notebook in notebooks/ runs top to bottom without a cell error, leaves no scratch folder behind,
and is committed executed, its pictures in the output cells."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # per cell; each notebook takes a minute or two on a CPU


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_executed_with_its_pictures(path: Path) -> None:
    """Readers see the pictures without running anything (on GitHub, in a viewer): committed after Run All."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [output for cell in code for output in cell.outputs]
    assert code and all(cell.execution_count for cell in code), f"{path.name}: commit it executed (Run All)"
    assert not [output for output in outputs if output.output_type == "error"], f"{path.name}: a cell failed"
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{path.name}: shows no picture"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    # The kernel is this interpreter's (the venv's); one torch thread like the rest of the suite.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env["TMPDIR"] = str(tmp_path)  # where the notebook's scratch folders go: it must clean them up
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    client.execute(env=env)  # raises CellExecutionError naming the cell and its traceback
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    executed = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
    assert all(count is not None for count in executed)  # every code cell ran
    assert not list(tmp_path.glob("protolib-notebook-*")), "the notebook left its scratch folder behind"
