"""The quickstart notebook runs top to bottom (on a tiny model, so it never rots)."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes_on_a_tiny_model(tmp_path, monkeypatch, tiny_llama_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BATCHJAX_QUICKSTART_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("BATCHJAX_QUICKSTART_SIZE", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "8 requests -> 2 groups" in outputs
    assert "batchllm" in outputs and "none" in outputs
