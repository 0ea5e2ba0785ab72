"""The results suite end to end at its smoke budget, on a small copy of the real Fashion-MNIST:
every row, two distillation seeds, soft labels, other architectures and the curve run, the
table is written from what they recorded, a second run reuses the finished steps instead of
recomputing them, and a changed budget is refused rather than mixed in."""

import gzip
import json
import os
import statistics
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_small_copy(directory, data, train=50, test=20):
    """Fashion-MNIST's IDX files holding each class's first `train` training and `test` test
    images (50: the mix init of IPC 10 at factor 2 needs 40)."""
    os.makedirs(directory)
    for split, x, y, n in (("train", data.x_train, data.y_train, train),
                           ("t10k", data.x_test, data.y_test, test)):
        keep = [i for c in range(10) for i in (y == c).nonzero()[0][:n]]
        with gzip.open(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(keep), 28, 28) + x[keep].tobytes())
        with gzip.open(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, len(keep)) + y[keep].astype("uint8").tobytes())


def table_rows(table, section):
    """The rows (lists of entries) of the Markdown table under `section`, below its header."""
    body = table.split(section)[1].split("\n## ")[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [line.strip("| ").split(" | ") for line in lines[2:]]


def by_label(rows):
    return {row[0]: row[1:] for row in rows}


def finals_of_check(directory, cell):
    """The final accuracies of the networks of a cell of the equal-budget check, every seed."""
    values = []
    for seed in sorted(os.listdir(os.path.join(directory, cell))):
        with open(os.path.join(directory, cell, seed, "evaluation.json")) as f:
            values += [r["final"] for r in json.load(f)["archs"]["convnet"]["runs"]]
    return values


def finals(cells, *names, key="convnet", arch="convnet"):
    """Every network's final accuracy that the named cells recorded for an evaluation."""
    values = []
    for name in names:
        with open(cells / name / "cell.json") as f:
            values += json.load(f)["evaluations"][key]["archs"][arch]["final"]
    return values


def test_results_suite_writes_the_table_and_resumes(tmp_path, fashion_mnist):
    write_small_copy(tmp_path / "data", fashion_mnist)
    cells, output = tmp_path / "cells", tmp_path / "RESULTS.md"
    common = [sys.executable, os.path.join(ROOT, "benchmarks", "results.py"), "--budget=smoke",
              f"--data_dir={tmp_path / 'data'}", "--ipcs=10", "--repeats=1",
              f"--work_dir={cells}", f"--output={output}"]
    args = common + ["--methods=random,herding,ncfm_nopsi,ncfm,whole", "--jobs=2"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "NCFM IPC 10 seed 1: distilling" in first.stdout
    table = output.read_text()

    # Every row has a number; a distilled row's entry spans its two seeds' networks.
    rows = by_label(table_rows(table, "## Test accuracy (%), final"))
    assert len(rows) == 5
    for label, (accuracy,) in rows.items():
        assert 0 <= float(accuracy.split(" ± ")[0]) <= 100, label
    ncfm = finals(cells, "ncfm_ipc10_seed0", "ncfm_ipc10_seed1")
    assert len(ncfm) == 2
    assert rows["NCFM (the defaults: ψ on)"] == [
        f"{statistics.fmean(ncfm):.2f} ± {statistics.pstdev(ncfm):.2f}"]
    # IOR and the gap to the whole set, from those networks.
    random, whole = finals(cells, "random_ipc10"), finals(cells, "whole")
    ior, gap = by_label(table_rows(table, "## Improvement over"))["NCFM (the defaults: ψ on)"]
    assert ior == f"{statistics.fmean(ncfm) - statistics.fmean(random):+.2f}"
    assert gap == f"{statistics.fmean(whole) - statistics.fmean(ncfm):.2f}"
    assert "- **IPC 10, NCFM − NCFM without ψ: " in table

    # Soft labels: the random subset under the NCFM set's teacher, whose accuracy is stated.
    with open(cells / "random_ipc10" / "eval_convnet_teacher" / "evaluation.json") as f:
        labels = json.load(f)["labels"]
    assert labels["teacher_of"] == str(cells / "ncfm_ipc10_seed0" / "distill" / "distilled.npz")
    assert f"(its own test accuracy: **{labels['teacher_accuracy']:.2f} %**)" in table
    soft = by_label(table_rows(table, "## Soft labels"))
    assert soft["Random real subset"][0] == f"{statistics.fmean(random):.2f}"
    for entries in soft.values():
        assert all(0 <= float(e) <= 100 for e in entries)
    cross = by_label(table_rows(table, "## Cross-architecture"))["NCFM (the defaults: ψ on)"]
    assert len(cross) == 4 and all(0 <= float(e) <= 100 for e in cross)

    # The curve: one point per iteration, drawn.
    assert "| iterations | 1 | 2 |" in table
    assert (cells / "accuracy_vs_iterations.png").stat().st_size > 0
    assert "](cells/accuracy_vs_iterations.png)" in table

    # The equal-budget section reads the committed cells.
    checked = os.path.join(ROOT, "results", "equal_budget_b0")
    ours = finals_of_check(checked, "defaults")
    official = finals_of_check(checked, "official")
    assert (f"| ours at B0 | {statistics.fmean(ours):.2f} ± {statistics.pstdev(ours):.2f} | "
            f"{len(ours)} |") in table
    difference = statistics.fmean(ours) - statistics.fmean(official)
    assert f"Ours − the official: **{difference:+.2f} (combined spread " in table

    # Cost: every step, and that two cells shared the CPU; the exact commands.
    steps = table_rows(table, "## Cost per cell")
    assert len(steps) == 17 and "2 cells at once" in table  # 11 for the table, 6 extras
    assert "python train.py --dataset=fashion_mnist" in table and "--seed=1" in table
    assert "python evaluate.py --dataset=fashion_mnist" in table and "--baseline=whole" in table
    assert "TensorFlow" in table and "published" in table

    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "distilling" not in second.stdout and "evaluating" not in second.stdout
    assert output.read_text().split("## Test accuracy")[1] == table.split("## Test accuracy")[1]

    # Another budget's command for a finished step is refused, not mixed in.
    changed = subprocess.run(args + ["--tabulate", "--repeats=2"], capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode != 0
    assert "this budget makes it by" in changed.stderr and "--repeats=2" in changed.stderr

    # --tabulate computes nothing: a row with no cells shows as pending.
    tabulated = subprocess.run(common + ["--methods=random,dm,ncfm", "--tabulate"],
                               capture_output=True, text=True, timeout=300)
    assert tabulated.returncode == 0, tabulated.stderr[-2000:]
    assert "distilling" not in tabulated.stdout and "evaluating" not in tabulated.stdout
    table = output.read_text()
    assert "| DM (`--loss=mmd`) | pending |" in table
    assert "- IPC 10, NCFM: " in table and " vs random" in table
    assert not (cells / "dm_ipc10_seed0").exists()

