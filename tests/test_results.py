"""The results suite end to end at its smoke budget: cells run, the table is written, and a
second run reuses the finished cells instead of recomputing them."""

import os
import subprocess
import sys

from conftest import FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_suite_writes_the_table_and_resumes(tmp_path):
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "results.py"), "--budget=smoke",
            f"--data_dir={FASHION_MNIST_DIR}", "--ipcs=1", "--methods=random,ncfm_nopsi,ncfm",
            "--repeats=1", "--nocross_arch", "--jobs=2", f"--work_dir={tmp_path}",
            f"--pool_dir={tmp_path / 'pools'}",
            f"--output={tmp_path / 'RESULTS.md'}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "ncfm ipc 1: distilling" in first.stdout
    table = (tmp_path / "RESULTS.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.split("## Test accuracy (%), final")[1].splitlines()
            if line.startswith("| ") and "IPC" not in line}
    for label in ("Random real subset", "NCFM without ψ (`--sampling_net=false`)",
                  "NCFM (ψ on, scales bounded by 2)"):
        assert 0 <= float(rows[label]) <= 100  # one network per cell: no ± spread shown
    assert "python train.py --dataset=fashion_mnist" in table  # the exact commands
    assert "TensorFlow" in table and "published" in table

    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "distilling" not in second.stdout and "evaluating" not in second.stdout
    assert (tmp_path / "RESULTS.md").read_text().split("## Test accuracy")[1] == \
        table.split("## Test accuracy")[1]

    # --tabulate computes nothing: a row with no cells shows as pending.
    tabulated = subprocess.run(args[:5] + ["--methods=random,dm,ncfm", "--tabulate"] + args[6:],
                               capture_output=True, text=True, timeout=300)
    assert tabulated.returncode == 0, tabulated.stderr[-2000:]
    assert "distilling" not in tabulated.stdout and "evaluating" not in tabulated.stdout
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| DM (`--loss=mmd`) | pending |" in table
    assert "- IPC 1, NCFM: " in table and " vs random" in table
    assert not (tmp_path / "dm_ipc1").exists()
