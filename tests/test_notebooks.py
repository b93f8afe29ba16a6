"""The tutorials in ``notebooks/`` run top to bottom, as a reader runs them.

Each notebook is executed in a fresh kernel in a temporary working directory; a cell that raises
fails the test with that cell's source and error. The notebooks are committed *with* their
outputs, so that they read well on GitHub and the Hub; after changing one, execute it and save
its outputs with

    python tests/test_notebooks.py [notebooks/NAME.ipynb ...]

(all notebooks when none is named).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
MAX_NOTEBOOK_BYTES = 1_000_000  # outputs included: small plots, no big tables
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def kernel_environment() -> dict[str, str]:
    """The kernel's environment: this checkout first on the import path, this Python's scripts
    (``scrnalf``) first on PATH, and no Hugging Face settings of the caller's (each notebook
    chooses its own Hub and cache)."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "HUGGING_FACE_")) and name != "TRANSFORMERS_OFFLINE"
    }
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CPUs shared with the kernel's subprocesses
    return environment


class NotebookCellError(Exception):
    """A cell of a notebook raised or timed out; the message holds its source, output and error."""


def _failed_cell_report(path: Path, notebook, error: Exception) -> str:
    """The failing cell's source, the end of what it printed (a command's one-line error is
    there) and its error, without the terminal colour codes of IPython tracebacks."""
    failed = next(
        (cell for cell in notebook.cells if any(output.output_type == "error" for output in cell.get("outputs", []))),
        None,
    )
    if failed is None:  # a timeout or a dead kernel leaves no error output
        return f"{path.name}: {type(error).__name__}: {ANSI_CODES.sub('', str(error))[-3000:]}"
    printed = "".join(output.get("text", "") for output in failed.outputs if output.output_type == "stream")
    raised = next(output for output in failed.outputs if output.output_type == "error")
    return "\n".join([
        f"{path.name}: cell [{failed.execution_count}] failed",
        "--- cell ---", failed.source,
        "--- its output (end) ---", "\n".join(printed.splitlines()[-30:]),
        "--- error ---", ANSI_CODES.sub("", f"{raised.ename}: {raised.evalue}"),
    ])


def execute_notebook(path: Path, working_dir: Path, timeout: int = CELL_TIMEOUT_S):
    """Run every cell of ``path`` in a new Python kernel started in ``working_dir``; return the
    executed notebook.

    Raises:
        NotebookCellError: for the first cell that raises (a failing ``%%bash`` command included)
            or runs past ``timeout`` seconds.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(working_dir)}},
    )
    try:
        client.execute(env=kernel_environment())
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        raise NotebookCellError(_failed_cell_report(path, notebook, error)) from None
    return notebook


def test_the_tutorials_are_there():
    assert [path.name for path in NOTEBOOKS] == [
        "01_annotate_cells_with_a_model_from_the_hub.ipynb",
        "02_finetune_compare_and_publish.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_is_executed_without_errors_and_small(path: Path):
    notebook = json.loads(path.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code_cells] == list(range(1, len(code_cells) + 1)), (
        f"{path.name} is not saved executed top to bottom: run python tests/test_notebooks.py {path.name}"
    )
    errors = [output for cell in code_cells for output in cell["outputs"] if output["output_type"] == "error"]
    assert not errors, f"{path.name} was saved with an error: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert any("image/png" in output.get("data", {}) for cell in code_cells for output in cell["outputs"])
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    try:
        execute_notebook(path, tmp_path)
    except NotebookCellError as error:
        pytest.fail(str(error), pytrace=False)


if __name__ == "__main__":
    import nbformat

    for path in [Path(argument).resolve() for argument in sys.argv[1:]] or NOTEBOOKS:
        with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as working_dir:
            started = time.perf_counter()
            executed = execute_notebook(path, Path(working_dir))
        nbformat.write(executed, path)
        print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s and saved with its outputs")
