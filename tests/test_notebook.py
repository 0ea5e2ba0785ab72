"""colab.ipynb executed headless (nbclient) with its tiny Fashion-MNIST settings. Skipped only
when the notebook tooling (nbclient, nbformat, an ipykernel) is not installed."""

import os

import pytest

from conftest import FASHION_MNIST_DIR

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_runs(tmp_path, monkeypatch):
    assert os.path.isdir(FASHION_MNIST_DIR)
    tmp_path = tmp_path / "My Drive"  # the notebook quotes the paths it pastes
    tmp_path.mkdir()
    monkeypatch.setenv("NCFM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NCFM_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(os.path.join(ROOT, "colab.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code"
               for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "convnet: final " in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the grid and the loss curves
    assert (tmp_path / "run" / "distilled.npz").is_file()
