"""The demo notebook runs top to bottom on the CPU in its small setting (executed with nbclient)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "clp_jax_demo.ipynb")


@pytest.mark.demo
@pytest.mark.slow  # ~3.5 min: run by .ci/run after the README's test command (`python -m pytest -q -m slow`)
def test_demo_notebook_runs_on_cpu(monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a laptop (the suite fakes 8)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                      for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "| verify |" in outputs and "| clp |" in outputs  # the table was rendered
    assert "tokens per pass" in outputs  # the streamed verify run
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
