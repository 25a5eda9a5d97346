"""The Colab notebooks run end to end on CPU in their tiny mode.

nbclient executes every cell in a fresh kernel, as "Run all" does, so a
notebook that falls behind the library fails here.
"""

import os
import pathlib
import time

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# Limit per cell and per notebook. The tiny modes took 60-130 s on two CPU
# cores shared with other jobs.
MAX_SECONDS = 240


def test_notebooks_found():
  assert [p.name for p in NOTEBOOKS] == ["querier_colab_tpu.ipynb",
                                         "xfusion_colab_tpu.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  parameters = [cell for cell in notebook.cells
                if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1, "one cell must be tagged 'parameters'"

  # The kernel inherits this environment, so the notebook's tiny mode and
  # the 8 simulated CPU devices of conftest.py apply inside it too.
  monkeypatch.setenv("XFUSION_NOTEBOOK_MODE", "cpu-tiny")
  monkeypatch.setenv("XFUSION_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  client = nbclient.NotebookClient(
      notebook, timeout=MAX_SECONDS, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  start = time.monotonic()
  client.execute()
  elapsed = time.monotonic() - start

  outputs = "".join(
      output.get("text", "") for cell in notebook.cells
      if cell.cell_type == "code" for output in cell.get("outputs", []))
  assert "mode cpu-tiny" in outputs
  assert "step " in outputs
  assert ": loss " in outputs
  assert elapsed < MAX_SECONDS, f"{path.name} took {elapsed:.0f} s"
