"""What a run writes, as a user meets it: outputs that cannot be written fail in one line before
any long work; files record what was done, not what was asked; file modes follow the umask; a
resume that would compute differently is refused."""

import errno
import os
import stat
import tempfile

import numpy as np
import pytest

import ncfm_keras as nk
from conftest import FASHION_MNIST_DIR, write_image_folder
from test_cli import FMNIST, assert_clean_error, run

TINY = ["--ipc=1", "--iterations=2", "--log_every=2", "--batch_real=8", "--num_freqs=64",
        "--num_pretrained=1", "--pretrain_epochs=0"]


# ---- A. outputs that cannot be written: one line, before the pool or a network trains ---------

@pytest.mark.parametrize("where,cause", [("file", "File exists"),
                                         ("file/out", "Not a directory")])
def test_train_output_dir_that_cannot_be_written_fails_before_the_pool(tmp_path, where, cause):
    (tmp_path / "file").write_text("not a folder")
    result = run("train.py", *FMNIST, *TINY, f"--output_dir={tmp_path / where}",
                 f"--pool_dir={tmp_path / 'pools'}")
    assert_clean_error(result, f"--output_dir={tmp_path / where} cannot be written ({cause})",
                       "choose another --output_dir")
    assert not (tmp_path / "pools").exists()  # nothing was trained
    result = run("train.py", *FMNIST, *TINY, f"--output_dir={tmp_path / 'out'}",
                 f"--pool_dir={tmp_path / where}")
    assert_clean_error(result, f"--pool_dir={tmp_path / where} cannot be written ({cause})")


def test_evaluate_output_dir_that_is_a_file_fails_before_any_network(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = run("evaluate.py", *FMNIST, "--baseline=random", "--ipc=1", "--epochs=1",
                 "--repeats=1", "--arch=convnet,alexnet", f"--output_dir={tmp_path / 'file'}")
    assert_clean_error(result, "--output_dir=", "cannot be written (File exists)")
    assert "repeat" not in result.stdout


def test_a_read_only_file_system_is_named_in_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(nk.NCFMError, match=r"--output_dir=.* cannot be written \(Read-only "
                                           r"file system\); choose another --output_dir"):
        nk.check_writable(str(tmp_path / "out"), "--output_dir")
    with pytest.raises(nk.WriteError, match=r"cannot write .*set.npz: Read-only file system; "
                                            "its previous version, if any, is intact"):
        nk.save_npz(str(tmp_path / "set.npz"), x=np.zeros(2))


def test_a_long_class_name_fits_the_file_system(tmp_path):
    """84 CJK characters (252 bytes) make a legal folder name, but images/NNN_<class> would be
    256 bytes: the export cuts names made from user text to fit."""
    long_name = "中" * 84
    write_image_folder(str(tmp_path / "data"), ["short", long_name], per_class=3, size=(16, 16))
    result = run("train.py", f"--dataset=folder:{tmp_path / 'data'}", "--image_size=16",
                 "--factor=1", "--init=real", *TINY, f"--output_dir={tmp_path / 'out'}",
                 f"--pool_dir={tmp_path / 'pools'}")
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(os.listdir(tmp_path / "out" / "images"))
    assert len(folders) == 2 and folders[0] == "000_short"
    assert folders[1].startswith("001_中") and len(folders[1].encode()) <= 255
    assert len(os.listdir(tmp_path / "out" / "images" / folders[1])) == 1  # ipc 1, factor 1


# ---- C. files record what was done ----------------------------------------------------------

def test_a_set_records_its_iterations_and_evaluate_warns_when_short(tmp_path):
    names = nk.MNIST_FAMILY["fashion_mnist"]
    config = dict(iterations=20)
    stopped = tmp_path / "stopped.npz"
    nk.save_distilled(str(stopped), nk.DistilledSet(
        np.full((10, 28, 28, 1), 0.5, np.float32), np.arange(10, dtype=np.int32), 1, 1,
        "fashion_mnist", names, np.float32([0.286]), np.float32([0.353]), config,
        iterations=10))
    assert nk.load_distilled(str(stopped)).iterations == 10
    result = run("evaluate.py", f"--distilled={stopped}", f"--data_dir={FASHION_MNIST_DIR}",
                 "--epochs=1", "--repeats=1", f"--output_dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 distillation iterations" in result.stdout
    assert "holds 10 of the 20 iterations its run asked for" in result.stderr
    import json
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["source"]["iterations"] == 10 and report["source"]["iterations_asked"] == 20


# ---- G. file modes --------------------------------------------------------------------------

def test_new_files_get_the_umask_mode_and_replaced_ones_keep_theirs(tmp_path):
    previous = os.umask(0o022)
    try:
        path = tmp_path / "state.npz"
        nk.save_npz(str(path), x=np.zeros(2))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(path, 0o640)
        nk.save_npz(str(path), x=np.ones(2))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        os.umask(0o077)
        nk.write_json(str(tmp_path / "private.json"), {})
        assert stat.S_IMODE(os.stat(tmp_path / "private.json").st_mode) == 0o600
    finally:
        os.umask(previous)


# ---- H. a resume that would compute differently ---------------------------------------------

def test_a_resume_under_other_computing_settings_is_refused(tmp_path):
    common = [*FMNIST, "--ipc=1", "--log_every=2", "--batch_real=8", "--num_freqs=64",
              "--num_pretrained=1", "--pretrain_epochs=0", f"--output_dir={tmp_path / 'out'}",
              f"--pool_dir={tmp_path / 'pools'}"]
    first = run("train.py", *common, "--iterations=2", "--jit_compile=false")
    assert first.returncode == 0, first.stderr[-3000:]
    for flag, conflict in (("--jit_compile=true", "jit_compile=False there, True now"),
                           ("--deterministic", "deterministic=False there, True now")):
        result = run("train.py", *common, "--iterations=4", "--jit_compile=false", flag)
        assert_clean_error(result, conflict, "--noresume")
