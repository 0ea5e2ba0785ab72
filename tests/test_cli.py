"""The command lines as a user meets them: subprocesses, exit codes and what they print."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FASHION_MNIST_DIR, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_error(result, *fragments):
    """Non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


FMNIST = ["--dataset=fashion_mnist", f"--data_dir={FASHION_MNIST_DIR}"]


@pytest.mark.parametrize("args,fragments", [
    (["--dataset=no_such_dataset"], ["unknown dataset 'no_such_dataset'", "folder:PATH"]),
    (["--dataset=fashion_mnst", f"--data_dir={FASHION_MNIST_DIR}"],
     ["unknown dataset 'fashion_mnst'", "did you mean fashion_mnist?"]),
    (["--dataset=fashion_mnist", "--data_dir=/nonexistent"], ["does not exist"]),
    (["--dataset=fashion_mnist", "--data_dir=/tmp"], ["no prepared TFDS dataset", "IDX"]),
    (FMNIST + ["--ipc=0"], ["ipc=0 is out of range: use 1..6000"]),
    (FMNIST + ["--ipc=6001"], ["ipc=6001 is out of range"]),
    (FMNIST + ["--arch=convnet,lenet"], ["--arch=convnet,lenet", "resnet18"]),
    (FMNIST + ["--repeats=0"], ["--repeats=0"]),
    (["--distilled=/nonexistent.npz"], ["does not exist"]),
    (["--baseline=foo"], ["--baseline=foo", "random|herding"]),  # absl's own checks, too
    (["--epochs=many"], ["--epochs=many"]),
    (["--no_such_flag=1"], ["no_such_flag"]),
])
def test_bad_input_fails_in_one_line(tmp_path, args, fragments):
    result = run("evaluate.py", *args, f"--output_dir={tmp_path}/out")
    assert_clean_error(result, *fragments)
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_stray_arguments_are_refused(tmp_path, script):
    """An unquoted path with a space, as a notebook pastes it: the end of the path became a
    positional argument that absl ignores, and the outputs landed in .../My, exit 0."""
    result = run(script, *FMNIST, f"--output_dir={tmp_path}/My", "Drive/ncfm",
                 f"--pool_dir={tmp_path}/pools")
    assert result.returncode == 2
    assert_clean_error(result, "unexpected argument 'Drive/ncfm' (after --output_dir=",
                       "quote a path that holds spaces")
    assert os.listdir(tmp_path) == []  # nothing written


def test_malformed_distilled_file(tmp_path):
    path = tmp_path / "set.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    assert_clean_error(run("evaluate.py", f"--distilled={path}"), "not a readable distilled-set")


def test_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run("evaluate.py", f"--dataset=folder:{empty}"), "0 class sub-directories")
    write_image_folder(str(tmp_path / "one"), ["only"], 4)
    assert_clean_error(run("evaluate.py", f"--dataset=folder:{tmp_path / 'one'}"),
                       "1 class sub-directories")


def test_folder_dataset_end_to_end(tmp_path):
    write_image_folder(str(tmp_path / "imgs"), ["dark", "mid", "light"], per_class=8,
                       size=(40, 30))
    result = run("evaluate.py", f"--dataset=folder:{tmp_path / 'imgs'}", "--ipc=3",
                 "--epochs=3", "--repeats=2", "--arch=convnet,alexnet", "--protocol=dm",
                 "--precision=mixed_bfloat16", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for arch in ("convnet", "alexnet"):
        line = next(line for line in lines if line.startswith(f"{arch}: final "))
        assert "±" in line and "best-seen" in line
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["source"] == {"baseline": "random", "ipc": 3}
    assert report["precision"] == "mixed_bfloat16" and "precision mixed_bfloat16" in result.stdout
    runs = report["archs"]["alexnet"]["runs"]
    assert len(runs) == 2 and all(0 <= r["final"] <= 100 for r in runs)
    assert report["archs"]["convnet"]["summary"]["final"][0] == pytest.approx(
        np.mean([r["final"] for r in report["archs"]["convnet"]["runs"]]))


def test_train_then_evaluate_on_fashion_mnist(tmp_path):
    out = tmp_path / "run"
    result = run("train.py", *FMNIST, "--ipc=1", "--iterations=4", "--log_every=2",
                 "--batch_real=8", "--num_freqs=64", "--num_pretrained=1",
                 "--pretrain_epochs=0", "--sampling_net=true",
                 f"--pool_dir={tmp_path / 'pools'}", f"--output_dir={out}", "--eval_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilled 4 iterations" in result.stdout
    # The device, an estimate after the first epoch, the peak memory in the last line:
    assert "device: CPU (" in result.stdout and "precision float32; XLA off" in result.stdout
    assert "estimate: the distillation (4 iterations) takes about" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("peak memory ") and "MiB (host peak RSS) on CPU" in last, last
    ran = json.loads((out / "run.json").read_text())
    assert ran["peak_memory_mib"] > 100 and ran["iterations_this_run"] == 4
    assert ran["device"].startswith("CPU") and ran["precision"] == "float32"
    for name in ("distilled.npz", "grid.png", "metrics.csv", "loss_curves.png",
                 "evaluation.json"):
        assert (out / name).is_file(), name
    assert os.listdir(out / "tensorboard")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,matching_loss,sampler_loss") and len(rows) == 5
    header = rows[0].split(",")
    assert float(rows[1].split(",")[header.index("frequency_norm")]) > 0  # psi's |t|
    assert rows[-1].split(",")[-1] != ""  # the final evaluation's accuracy
    folders = sorted(os.listdir(out / "images"))
    assert len(folders) == 10 and len(os.listdir(out / "images" / folders[0])) == 4  # 1 x 2^2
    from PIL import Image
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (10 * 28, 28) and grid.std() > 10  # one row per class, not blank
    assert os.listdir(tmp_path / "pools")  # the pool was cached

    evaluated = run("evaluate.py", f"--distilled={out / 'distilled.npz'}",
                    f"--data_dir={FASHION_MNIST_DIR}", "--epochs=2", "--repeats=1",
                    f"--output_dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "convnet: final " in evaluated.stdout
    assert "device: CPU (" in evaluated.stdout
    assert "estimate: convnet (1 network) takes about" in evaluated.stdout
    assert evaluated.stdout.strip().splitlines()[-1].startswith("peak memory ")
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["source"]["factor"] == 2 and report["dataset"] == "fashion_mnist"
    assert report["peak_memory_mib"] > 100 and report["device"].startswith("CPU")
    assert report["tested_on"] == "test split"

    validated = run("evaluate.py", f"--distilled={out / 'distilled.npz'}",
                    f"--data_dir={FASHION_MNIST_DIR}", "--epochs=2", "--repeats=1",
                    "--validation=1000", f"--output_dir={tmp_path / 'val'}")
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "(on the validation: 1000 training images)" in validated.stdout
    report = json.loads((tmp_path / "val" / "evaluation.json").read_text())
    assert report["tested_on"] == "validation: 1000 training images"


@pytest.mark.parametrize("args,fragments", [
    (["--ipc=0"], ["--ipc=0"]),
    (["--ipc=2000"], ["init=mix with ipc=2000 and factor=2 needs 8000", "init=real"]),
    (["--num_freqs=100"], ["num_freqs must be a positive multiple of 16"]),
    (["--loss=kl"], ["loss must be cf or mmd"]),
    (["--iterations=15", "--log_every=10"], ["multiple of --log_every"]),
    (["--precision=float64"], ["--precision=float64", "mixed_float16"]),
    (["--sampling_net=maybe"], ["--sampling_net=maybe"]),
])
def test_train_bad_input(tmp_path, args, fragments):
    result = run("train.py", *FMNIST, *args, f"--output_dir={tmp_path}/out",
                 f"--pool_dir={tmp_path}/pools")
    assert_clean_error(result, *fragments)
    assert not os.path.exists(tmp_path / "out")


def test_train_names_settings_the_method_never_reads(tmp_path):
    """psi's settings without psi, or CF settings with the MMD loss, were silently dropped."""
    common = ["--dataset=fashion_mnist", "--data_dir=/nonexistent", f"--output_dir={tmp_path}"]
    no_psi = run("train.py", *common, "--sampling_net=false", "--sampler_lr=0.1",
                 "--frequency_draw=per_iteration")
    assert "warning: --sampling_net=false (no psi) ignores --sampler_lr" in no_psi.stderr
    assert "--frequency_draw" not in no_psi.stderr  # plain CF matching reads it
    mmd = run("train.py", *common, "--loss=mmd", "--num_freqs=256", "--alpha=0.2")
    assert "warning: --loss=mmd ignores --num_freqs, --alpha" in mmd.stderr
    for result in (no_psi, mmd):  # the run itself goes on to the next check
        assert result.returncode != 0 and "error: data_dir /nonexistent" in result.stderr


def test_evaluate_names_settings_it_never_reads(tmp_path):
    """The same for evaluate.py: a baseline's flags with --distilled, teacher flags with hard
    labels, --ipc with the whole training set."""
    result = run("evaluate.py", f"--distilled={tmp_path}/none.npz", "--ipc=5", "--baseline=herding",
                 f"--pool_dir={tmp_path}", "--repeats=1")
    assert "warning: --distilled ignores --baseline, --ipc" in result.stderr
    assert "warning: --labels=hard ignores --pool_dir" in result.stderr
    assert "--repeats" not in result.stderr
    assert result.returncode != 0 and "error: distilled-set file" in result.stderr
    result = run("evaluate.py", f"--dataset=folder:{tmp_path}/none", "--baseline=whole",
                 "--ipc=5")
    assert "warning: --baseline=whole ignores --ipc" in result.stderr
    assert result.returncode != 0


def test_train_stops_on_a_nonfinite_loss(tmp_path):
    out = tmp_path / "out"
    result = run("train.py", *FMNIST, "--ipc=1", "--iterations=4", "--log_every=2",
                 "--batch_real=8", "--num_freqs=64", "--num_pretrained=1", "--pretrain_epochs=0",
                 "--sampling_net=true", "--sampler_lr=1e30",
                 f"--output_dir={out}", f"--pool_dir={tmp_path}/pools")
    assert_clean_error(result, "iteration 1: the loss or a gradient is not finite",
                       "--sampler_lr")
    with np.load(out / "distilled.npz") as f:  # written for the stopped epoch: still finite
        assert np.all(np.isfinite(f["images"]))


@pytest.mark.parametrize("argv,wanted", [
    ([], False),
    (["--deterministic"], True),
    (["-deterministic"], True),
    (["--deterministic=1"], True),
    (["--deterministic=t"], True),
    (["--deterministic=false"], False),
    (["--deterministic", "--nodeterministic"], False),
    (["--nodeterministic", "--deterministic=TRUE"], True),
    (["--deterministic=maybe"], False),
    (["--", "--deterministic"], False),
    (["--deterministic_ish"], False),
])
def test_determinism_is_read_from_argv_as_absl_reads_it(argv, wanted):
    import cli
    assert cli.asks_for_determinism(argv) is wanted


def test_deterministic_from_a_flag_file_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    (tmp_path / "flags.txt").write_text("--deterministic\n")
    result = run("train.py", *FMNIST, f"--flagfile={tmp_path}/flags.txt",
                 f"--output_dir={tmp_path}/out", f"--pool_dir={tmp_path}/pools")
    assert_clean_error(result, "--deterministic came from a flag file", "TF_ENABLE_ONEDNN_OPTS=0")
    assert not os.path.exists(tmp_path / "out")


def npz_paths_named(line):
    return [word.strip("(),;") for word in line.split() if ".npz" in word]


@pytest.mark.parametrize("flag", ["--sampler_lr=1e4", "--sampler_lr=1e5", "--image_lr=inf"])
def test_train_stops_when_its_state_cannot_be_saved(tmp_path, flag):
    """psi's batch-norm variance overflows under a huge --sampler_lr while every loss stays
    finite; the run must stop, not go on skipping every checkpoint. No message may name a
    checkpoint that was never written."""
    out = tmp_path / "out"
    result = run("train.py", *FMNIST, "--ipc=1", "--iterations=20", "--log_every=5",
                 "--batch_real=16", "--num_freqs=256", "--num_pretrained=1",
                 "--pretrain_epochs=0", "--init=real", "--sampling_net=true", flag,
                 f"--output_dir={out}", f"--pool_dir={tmp_path}/pools")
    assert_clean_error(result, "not finite", flag.split("=")[0])
    assert "warning" not in result.stdout
    line = result.stderr.strip()
    for path in npz_paths_named(line):
        assert os.path.exists(path), line
    if (out / "checkpoint.npz").exists():
        with np.load(out / "checkpoint.npz") as f:
            done = json.loads(str(f["header"]))["epochs_done"]
        assert f"checkpoint.npz, iteration {done * 5}) is intact" in line
    else:
        assert "no checkpoint had been written yet" in line


def test_offline_tfds_download_fails_fast(tmp_path):
    """No network (the proxy refuses all): TFDS would retry for minutes; one line within 30 s
    naming the offline ways, both with the default data dir and with an empty --data_dir."""
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    (tmp_path / "empty").mkdir()
    for extra in ([], [f"--data_dir={tmp_path / 'empty'}"]):
        start = time.time()
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                                 "--dataset=cifar10", "--ipc=10", f"--output_dir={tmp_path}/out",
                                 *extra], capture_output=True, text=True, env=env, timeout=120)
        assert time.time() - start < 30
        assert_clean_error(result, "cifar10", "IDX files in --data_dir", "folder:PATH",
                           "tfds build cifar10")
        assert not os.path.exists(tmp_path / "out")


def test_a_gpu_that_tensorflow_cannot_see_is_warned_about(tmp_path):
    """CUDA_VISIBLE_DEVICES says a GPU is meant to be used; this TensorFlow sees none."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), *FMNIST, "--baseline=random",
         "--ipc=1", "--epochs=1", "--repeats=1", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert "a GPU seems present (CUDA_VISIBLE_DEVICES=0) but TensorFlow sees none" in warning[0]
    assert "'On a GPU / on Colab'" in warning[0]
    assert "device: CPU (" in result.stdout
