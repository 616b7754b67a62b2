"""The notebooks execute top to bottom without errors, and are stored
without outputs."""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300

# (notebook, working directory): both places a user starts from are covered.
CASES = [("01_quickstart.ipynb", NOTEBOOKS),
         ("02_noise_scale.ipynb", NOTEBOOKS),
         ("03_round_kernel.ipynb", ROOT)]


def test_every_notebook_is_covered():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(
      name for name, _ in CASES)


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown", "start with what it shows"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name}: cell {i} has outputs"
      assert cell.execution_count is None, f"{name}: cell {i} was executed"


@pytest.mark.parametrize("name,cwd", CASES, ids=[n for n, _ in CASES])
def test_executes(name, cwd, tmp_path, monkeypatch):
  # The notebooks write their runs under tempfile.mkdtemp(): keep them here.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(cwd)}})
  start = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name} (run from {cwd}): {e}")
  took = time.perf_counter() - start
  print(f"{name}: executed in {took:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
