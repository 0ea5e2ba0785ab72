"""colab.ipynb: executed headless (nbclient) with its tiny Fashion-MNIST settings; its settings
cells with Drive on, against a temporary folder standing in for Colab's /content/drive; and its
stop when train.py fails. Skipped only when the notebook tooling (nbclient, nbformat, an
ipykernel) is not installed."""

import os
import shlex
import subprocess
import sys
import types

import pytest

from conftest import FASHION_MNIST_DIR

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab.ipynb")


def tagged(tag):
    """The sources of the notebook's code cells tagged `tag`, in order."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return [cell.source for cell in notebook.cells
            if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])]


def run_settings(namespace=None):
    """Executes the settings cells (the first two) in `namespace`; returns it."""
    namespace = {} if namespace is None else namespace
    for source in tagged("settings"):
        exec(source, namespace)
    return namespace


def fake_colab(monkeypatch, mounted):
    """Makes `from google.colab import drive` give a drive whose mount records its mount point
    in `mounted` and creates MyDrive there, as Colab's does."""
    def mount(root):
        mounted.append(root)
        os.makedirs(os.path.join(root, "MyDrive"))
    monkeypatch.setitem(sys.modules, "google.colab",
                        types.SimpleNamespace(drive=types.SimpleNamespace(mount=mount)))


def test_colab_notebook_runs(tmp_path, monkeypatch):
    assert os.path.isdir(FASHION_MNIST_DIR)
    tmp_path = tmp_path / "My Drive"  # the notebook quotes the paths it pastes
    tmp_path.mkdir()
    monkeypatch.setenv("NCFM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NCFM_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code"
               for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "train.py --dataset=fashion_mnist" in text  # the command, then its output
    assert "convnet: final " in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the grid and the loss curves
    assert (tmp_path / "fashion_mnist_ipc1" / "distilled.npz").is_file()


def test_settings_with_drive_mount_it_and_put_the_run_there(tmp_path, monkeypatch, capfd):
    root = tmp_path / "My Drive"  # stands in for /content/drive; a space, as some mounts have
    monkeypatch.delenv("NCFM_NOTEBOOK_SMOKE", raising=False)
    monkeypatch.setenv("NCFM_DRIVE_ROOT", str(root))
    mounted = []
    fake_colab(monkeypatch, mounted)
    namespace = run_settings()
    assert namespace["USE_DRIVE"] and mounted == [str(root)]
    runs = root / "MyDrive" / "ncfm-keras"
    assert namespace["OUT"] == str(runs / "cifar10_ipc10")
    assert namespace["POOL_DIR"] == str(runs / "pools")
    command = namespace["TRAIN_COMMAND"]
    assert f"--output_dir={runs / 'cifar10_ipc10'}" in command  # one argument, space and all
    assert f"--pool_dir={runs / 'pools'}" in command
    # The line `run` shows is quoted: split as a shell would, it gives the same arguments.
    echo = [sys.executable, "-c", "import sys; print(sys.argv[1:])", *command[2:]]
    namespace["run"](echo)
    shown, printed = capfd.readouterr().out.splitlines()[-2:]
    assert shlex.split(shown.removeprefix("$ ")) == echo
    assert printed == str(command[2:])


def test_settings_with_drive_but_no_drive_stop_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("NCFM_NOTEBOOK_SMOKE", raising=False)
    monkeypatch.setenv("NCFM_DRIVE_ROOT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not on Colab: no mount
    with pytest.raises(SystemExit, match="no Google Drive at .*USE_DRIVE = False"):
        run_settings()


def test_smoke_mode_turns_drive_off(tmp_path, monkeypatch):
    monkeypatch.setenv("NCFM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NCFM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "google.colab", None)
    namespace = run_settings()
    assert not namespace["USE_DRIVE"]
    assert namespace["OUT"] == str(tmp_path / "fashion_mnist_ipc1")


def test_a_failing_train_py_stops_the_notebook(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("NCFM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NCFM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.chdir(ROOT)
    settings, paths = tagged("settings")
    namespace = {}
    exec(settings, namespace)
    namespace["TRAIN_FLAGS"] += " --iterations=0"  # train.py refuses it in one line, exit 2
    exec(paths, namespace)
    (distil,) = tagged("distil")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        exec(distil, namespace)
    assert failed.value.returncode == 2
    assert "iterations must be >= 1" in capfd.readouterr().out  # its output, shown
