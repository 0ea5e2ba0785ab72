"""Which data a run used, as the command lines meet it: folders with junk and broken files, a
distilled set evaluated from elsewhere or against another project's folder of the same name,
pretrained pools and checkpoints of two such projects."""

import json
import os
import shutil

import numpy as np

from conftest import FASHION_MNIST_DIR, write_image_folder
from test_cli import assert_clean_error, run

TRAIN = ["--dataset=folder:data/clothes", "--ipc=1", "--iterations=2", "--log_every=2",
         "--batch_real=4", "--num_freqs=64", "--num_pretrained=1", "--pretrain_epochs=0",
         "--init=real", "--output_dir=run"]
# Past every check of the data, evaluate.py stops here in one line instead of training.
PAST_THE_CHECKS = ["--validation=100000", "--epochs=1", "--repeats=1"]


def test_junk_and_broken_files_in_a_folder(tmp_path):
    write_image_folder(str(tmp_path), ["bag", "shirt"], 5)
    os.makedirs(tmp_path / ".ipynb_checkpoints")
    (tmp_path / "bag" / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / "shirt" / "x.png").write_bytes(b"")
    result = run("evaluate.py", f"--dataset=folder:{tmp_path}", "--ipc=100",
                 f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    warning, error = result.stderr.strip().splitlines()  # .ipynb_checkpoints is no class
    assert warning.startswith("warning: left out 1 of 11 files") and "shirt/x.png" in warning
    assert error.startswith("error: ipc=100 is out of range: use 1..4")


def test_a_distilled_set_names_its_data_and_pools_follow_the_images(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"  # two projects, each with data/clothes
    write_image_folder(str(one / "data" / "clothes"), ["bag", "shirt", "trouser"], 5)
    write_image_folder(str(two / "data" / "clothes"), ["bag", "shirt", "trouser"], 5, seed=1)
    pools = f"--pool_dir={tmp_path / 'pools'}"
    for project in (one, two):
        result = run("train.py", *TRAIN, pools, cwd=project)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "pools")) == 2  # same name and counts, other images
    distilled = one / "run" / "distilled.npz"
    with np.load(distilled) as f:
        assert str(f["dataset"]) == f"folder:{one / 'data' / 'clothes'}"
        digest = str(f["data_digest"])
    with np.load(two / "run" / "distilled.npz") as f:
        assert str(f["data_digest"]) != digest

    # From any directory, by default on the data it came from.
    result = run("evaluate.py", f"--distilled={distilled}", "--epochs=1", "--repeats=1",
                 f"--output_dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["dataset"] == f"folder:{one / 'data' / 'clothes'}"
    # Any spelling of the same data is accepted (the run stops at --validation, past the checks).
    for cwd, spelling in ((tmp_path, f"{one}/data/../data/clothes/"), (one, "data/clothes")):
        result = run("evaluate.py", f"--distilled={distilled}",
                     f"--dataset=folder:{spelling}", *PAST_THE_CHECKS, cwd=cwd)
        assert_clean_error(result, "validation size 100000 is out of range")
    # Another project's data/clothes is refused; without --dataset the original is used.
    result = run("evaluate.py", f"--distilled={distilled}", "--dataset=folder:data/clothes",
                 *PAST_THE_CHECKS, cwd=two)
    assert_clean_error(result, f"folder:{two / 'data' / 'clothes'} is not the data",
                       "other images")
    result = run("evaluate.py", f"--distilled={distilled}", "--epochs=1", "--repeats=1",
                 f"--output_dir={two / 'eval'}", cwd=two)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((two / "eval" / "evaluation.json").read_text())
    assert report["dataset"] == f"folder:{one / 'data' / 'clothes'}"

    # A resumed run: another spelling of the same data continues, other images are refused.
    result = run("train.py", *TRAIN[1:], f"--dataset=folder:{one}/data/clothes", pools,
                 cwd=one)
    assert result.returncode == 0 and "resuming from iteration 2" in result.stdout, \
        result.stderr[-3000:]
    shutil.copytree(one / "run", two / "copied")
    result = run("train.py", *TRAIN, "--output_dir=copied", pools, cwd=two)
    assert_clean_error(result, "from a run with other settings (data_digest=")

    # The data moved: said in one line; passing its new place works.
    os.rename(one / "data" / "clothes", one / "data" / "moved")
    result = run("evaluate.py", f"--distilled={distilled}", *PAST_THE_CHECKS, cwd=tmp_path)
    assert_clean_error(result, "does not exist (any more)", "--dataset=folder:PATH")
    result = run("evaluate.py", f"--distilled={distilled}",
                 f"--dataset=folder:{one / 'data' / 'moved'}", *PAST_THE_CHECKS)
    assert_clean_error(result, "validation size 100000 is out of range")
    # ... also when the set's own pool teaches soft labels: the teacher is found by the data's
    # digest, not by the name it was distilled under.
    result = run("evaluate.py", f"--distilled={distilled}", "--labels=teacher",
                 "--hard_label_epochs=0", f"--dataset=folder:{one / 'data' / 'moved'}",
                 *PAST_THE_CHECKS)
    assert_clean_error(result, "validation size 100000 is out of range")


def test_distilled_sets_from_before_digests_still_evaluate(tmp_path):
    write_image_folder(str(tmp_path / "data" / "clothes"), ["bag", "shirt"], 5)
    distilled = tmp_path / "old.npz"
    np.savez(distilled, format="ncfm-keras distilled set v1",
             images=np.full((2, 32, 32, 3), 0.5, np.float32), labels=np.arange(2), ipc=1,
             factor=2, dataset="folder:data/clothes", class_names=np.array(["bag", "shirt"]),
             mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.2, np.float32), config="{}")
    result = run("evaluate.py", f"--distilled={distilled}", *PAST_THE_CHECKS, cwd=tmp_path)
    assert_clean_error(result, "validation size 100000 is out of range")


def test_results_suite_resolves_relative_paths_where_it_is_run(tmp_path):
    write_image_folder(str(tmp_path / "data" / "clothes"), ["bag", "shirt"], 5)
    result = run("benchmarks/results.py", "--dataset=folder:data/clothes", "--budget=smoke",
                 "--ipcs=1", "--methods=random", "--repeats=1", "--nocross_arch",
                 "--work_dir=cells", "--output=table.md", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "cells" / "random_ipc1" / "cell.json").is_file()
    assert f"--dataset=folder:{tmp_path / 'data' / 'clothes'}" in (
        tmp_path / "table.md").read_text()


def test_idx_distilled_sets_find_their_data_dir(tmp_path, fashion_mnist):
    import ncfm_keras as nk
    d = fashion_mnist
    for name, digest in (("same.npz", d.digest), ("other.npz", "0123456789abcdef")):
        nk.save_distilled(str(tmp_path / name), nk.DistilledSet(
            np.full((10, 28, 28, 1), 0.5, np.float32), np.arange(10), 1, 1, d.name,
            d.class_names, d.mean, d.std, {}, data_dir=d.data_dir, data_digest=digest))
    result = run("evaluate.py", f"--distilled={tmp_path / 'same.npz'}", *PAST_THE_CHECKS)
    assert_clean_error(result, "validation size 100000 is out of range")  # no --data_dir needed
    result = run("evaluate.py", f"--distilled={tmp_path / 'other.npz'}", *PAST_THE_CHECKS)
    assert_clean_error(result, f"fashion_mnist in {FASHION_MNIST_DIR} is not the data")


def test_dataset_names_as_people_write_them(tmp_path, fashion_mnist):
    """--dataset=Fashion-MNIST with the IDX files in --data_dir was told the folder holds no
    prepared TFDS dataset; a set distilled from fashion_mnist (a file from before digests, so
    the name decides) is evaluated on --dataset=FashionMNIST."""
    result = run("evaluate.py", "--dataset=Fashion-MNIST", f"--data_dir={FASHION_MNIST_DIR}",
                 *PAST_THE_CHECKS)
    assert_clean_error(result, "validation size 100000 is out of range")
    import ncfm_keras as nk
    d = fashion_mnist
    nk.save_distilled(str(tmp_path / "old.npz"), nk.DistilledSet(
        np.full((10, 28, 28, 1), 0.5, np.float32), np.arange(10), 1, 1, d.name, d.class_names,
        d.mean, d.std, {}))
    result = run("evaluate.py", f"--distilled={tmp_path / 'old.npz'}", "--dataset=FashionMNIST",
                 f"--data_dir={FASHION_MNIST_DIR}", *PAST_THE_CHECKS)
    assert_clean_error(result, "validation size 100000 is out of range")
