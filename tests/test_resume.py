"""Interrupted distillations: SIGKILL at any moment, SIGTERM (saves, then exits), resuming
with --deterministic equal to an uninterrupted run, and refusing a conflicting resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 16


def train_command(out, pools, *flags):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--dataset=fashion_mnist",
            f"--data_dir={FASHION_MNIST_DIR}", "--log_every=2", "--pretrain_epochs=0",
            f"--pool_dir={pools}", f"--output_dir={out}", *flags]


def command(out, pools, *extra):
    return train_command(out, pools, "--ipc=2", f"--iterations={ITERATIONS}",
                         "--batch_real=64", "--num_freqs=256", "--num_pretrained=2",
                         "--deterministic", *extra)


def images(out):
    with np.load(out / "distilled.npz") as f:
        return f["images"]


def epochs_done(out):
    with np.load(out / "checkpoint.npz") as f:
        return json.loads(str(f["header"]))["epochs_done"]


def start_and_interrupt(args, out, signum):
    """Starts train.py, sends `signum` once its first checkpoint exists; returns the result."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.npz").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path):
    pools = tmp_path / "pools"
    whole = subprocess.run(command(tmp_path / "whole", pools), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    code, _, _ = start_and_interrupt(command(out, pools), out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert epochs_done(out) < ITERATIONS // 2  # it really stopped mid-run
    resumed = subprocess.run(command(out, pools), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from iteration" in resumed.stdout
    np.testing.assert_array_equal(images(out), images(tmp_path / "whole"))
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, ITERATIONS + 1))


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    out, pools = tmp_path / "run", tmp_path / "pools"
    code, _, stderr = start_and_interrupt(command(out, pools), out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "Re-run the same command to continue" in stderr
    done = epochs_done(out)
    assert 0 < done < ITERATIONS // 2
    assert np.all(np.isfinite(images(out)))
    with np.load(out / "distilled.npz") as f:  # the set says what it holds, not what was asked
        assert int(f["iterations"]) == 2 * done

    conflict = subprocess.run(command(out, pools, "--num_freqs=512"), capture_output=True,
                              text=True, timeout=600)
    assert conflict.returncode == 2
    lines = conflict.stderr.strip().splitlines()
    assert len(lines) == 1 and "--num_freqs=256 there, 512 now" in lines[0], conflict.stderr

    resumed = subprocess.run(command(out, pools), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from iteration {done * 2}" in resumed.stdout
    assert epochs_done(out) == ITERATIONS // 2


def tiny(out, pools, iterations, *extra):
    return train_command(out, pools, "--ipc=1", f"--iterations={iterations}", "--batch_real=8",
                         "--num_freqs=64", "--num_pretrained=1", "--init=real", *extra)


def test_rerunning_a_finished_run_with_fewer_as_many_or_more_iterations(tmp_path):
    out, pools = tmp_path / "run", tmp_path / "pools"
    first = subprocess.run(tiny(out, pools, 4), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = images(out)

    fewer = subprocess.run(tiny(out, pools, 2), capture_output=True, text=True, timeout=600)
    assert fewer.returncode == 2 and "-2 in this run" not in fewer.stdout
    lines = fewer.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds 4 iterations, more than --iterations=2" in \
        lines[0] and "cannot be shortened" in lines[0], fewer.stderr
    np.testing.assert_array_equal(images(out), finished)
    assert epochs_done(out) == 2

    (out / "distilled.npz").unlink()  # lost after the last checkpoint: rewritten from it
    stale = [out / ".checkpoint.npzk1ll3d.tmp", next((out / "images").iterdir()) / ".0.pngx.tmp"]
    for path in stale:  # what a SIGKILL during atomic_write leaves
        path.write_bytes(b"partial")
    same = subprocess.run(tiny(out, pools, 4), capture_output=True, text=True, timeout=600)
    assert same.returncode == 0, same.stderr[-3000:]
    assert "nothing to do" in same.stdout and "already holds all 4 iterations" in same.stdout
    assert "0 in this run" not in same.stdout
    np.testing.assert_array_equal(images(out), finished)
    assert not any(path.exists() for path in stale)

    more = subprocess.run(tiny(out, pools, 6), capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from iteration 4" in more.stdout
    assert "distilled 6 iterations (2 in this run" in more.stdout
    assert epochs_done(out) == 3


def test_a_second_sigterm_stops_at_once_and_keeps_the_checkpoint(tmp_path):
    """The second signal arrives during a long step (16384 frequencies: seconds on a CPU): it
    must not wait for the step to end."""
    out = tmp_path / "run"
    args = tiny(out, tmp_path / "pools", 40, "--log_every=1", "--num_freqs=16384",
                "--sampling_net=true")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.npz").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(1.0)  # into the next step
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert time.time() - sent < 3, stderr[-3000:]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "send it again to stop at once" in stdout
    assert "Traceback" not in stderr and "SIGTERM again: stopped at once" in stderr
    assert "is intact" in stderr
    assert epochs_done(out) >= 1 and np.all(np.isfinite(images(out)))
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
