"""What still separates ncfm-keras from the official code at budget B0: an ablation, one command.

    python benchmarks/ablation_b0.py                          # every cell (hours on a CPU)
    python benchmarks/ablation_b0.py --only=today,faithful    # some cells
    python benchmarks/ablation_b0.py --table                  # only rewrite the table
    python benchmarks/ablation_b0.py --split=test              # the held-out equal-budget check

The same script makes the **held-out equal-budget check** with --split=test: the cells
`defaults` (train.py with the B0 flags alone, i.e. today's defaults) and `official`, evaluated
on the real Fashion-MNIST test split at --epochs (300 there), into results/equal_budget_b0/ and
results/equal_budget_b0.md by default. The ablation never looks at the test split.

Budget B0 (Fashion-MNIST IPC 10, as the official set in ../shared/official/ was made): a pool of
2 ConvNets x 2 epochs on a class-balanced 10 000-image training subset (the first 1000 images of
each class), 100 iterations, batch_real 256, 4096 frequencies, psi off, calibration on, AdamW
1e-3. Every set is evaluated on a **validation split** that distillation never sees (the next
1000 training images of each class), never on the test split: `evaluate.py`, ncfm protocol,
--epochs (100: enough to rank, not the 2000 of a final number), 3 ConvNet-3s per set, for each
of --seeds distillation seeds.

Each cell switches items of the official code's behaviour on or off (see CELLS); "today" is the
behaviour before they were made the defaults: 28x28 images zero-padded to 32x32 pixels (written
so into the split's IDX files: the old geometry, with stored 32x32 images), a random mix init
with area-downsampled cells, calibration DSA per image and a fresh real batch per iteration.
Everything a cell produces stays in --work_dir/<cell>/seed<s>/ (train and evaluate logs,
metrics.csv, evaluation.json, distilled.npz, timing.json); a finished one is reused, so the
suite can be stopped and continued. The data splits and pools go to --scratch_dir (rebuilt
when missing). The table goes to --table_path.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_enum("split", "validation", ["validation", "test"],
                  "What sets are evaluated on: the validation split (the ablation) or the "
                  "real test split (the held-out check; its defaults: cells defaults and "
                  "official, 300 epochs, results/equal_budget_b0).")
flags.DEFINE_string("work_dir", None, "Where each cell's logs, set and evaluation go "
                    "(committed; default results/ablation_b0 or results/equal_budget_b0).")
flags.DEFINE_string("scratch_dir", "/tmp/ablation_b0", "Where the data splits and pools go.")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_string("official", os.path.join(os.path.dirname(ROOT), "shared", "official",
                                             "fmnist_ipc10_b0.npz"),
                    "The official code's own B0 set.")
flags.DEFINE_list("only", None, "Run only these cells (default: all, in CELLS' order).")
flags.DEFINE_list("seeds", ["0", "1"], "Distillation seeds per cell.")
flags.DEFINE_integer("epochs", None, "Evaluation epochs (default 100 for validation, 300 "
                     "for test).")
flags.DEFINE_integer("repeats", 3, "Networks per set.")
flags.DEFINE_bool("table", False, "Only rewrite the table from the finished cells.")
flags.DEFINE_string("table_path", None, "Where the table is written (default "
                    "results/ablation_b0.md or results/equal_budget_b0.md).")
FLAGS = flags.FLAGS

B0 = ["--dataset=fashion_mnist", "--ipc=10", "--iterations=100", "--num_pretrained=2",
      "--pretrain_epochs=2", "--batch_real=256", "--num_freqs=4096", "--sampling_net=false",
      "--calibration=1", "--image_lr=1e-3", "--log_every=10"]
TODAY = {"init_from": "random", "init_resize": "area", "calibration_augment": "per_sample",
         "real_batch": "shuffled"}
FAITHFUL = {"init_from": "first", "init_resize": "nearest", "calibration_augment": "per_class",
            "real_batch": "shuffled"}
# cell -> (geometry: "padded" 32x32 pixels or "native" 28x28, the settings, what it shows)
CELLS = {
    "today": ("padded", TODAY, "the behaviour before this change"),
    "init": ("padded", {**TODAY, "init_from": "first", "init_resize": "nearest"},
             "item 1 alone: the official mix init (first images, nearest-neighbour cells)"),
    "geometry": ("native", TODAY, "item 2 alone: 28x28 kept, the network pads (mean frame)"),
    "calibration": ("padded", {**TODAY, "calibration_augment": "per_class"},
                    "item 4 alone: calibration DSA one draw per class"),
    "first_batch": ("padded", {**TODAY, "real_batch": "first"},
                    "item 5 alone: the same first 256 real images of a class every iteration"),
    "faithful": ("native", FAITHFUL, "items 1, 2, 4 together: the new defaults"),
    "faithful_first_batch": ("native", {**FAITHFUL, "real_batch": "first"},
                             "the new defaults with the official fixed real batch"),
    "faithful_random_init": ("native", {**FAITHFUL, "init_from": "random"},
                             "the new defaults with random (not first) images in the mix init"),
    "faithful_psi": ("native", {**FAITHFUL, "sampling_net": "true"},
                     "the new defaults with psi on"),
    "class_views": ("native", {"frequency_draw": "class_views"},
                    "one frequency draw per iteration and per-class views (the default "
                    "from cf86be3)"),
    "herding_init": ("native", {"init_from": "herding"},
                     "the defaults with herding's choice (pool member 0's features) in the "
                     "mix init"),
    "defaults": ("native", {}, "train.py's defaults with the B0 flags, at the commit of "
                 "timing.json (the held-out check's cell)"),
}
OFFICIAL = "official"  # the official code's own set: evaluated, not distilled
HELD_OUT = "defaults"  # the cell of the held-out check on the test split


def write_split(directory, pad, test):
    """IDX files: train = the first 1000 training images per class, t10k = the next 1000 (the
    validation split) or, with `test`, the real test split; `pad` zero-pads the 28x28 pixels to
    32x32 (the old geometry)."""
    import ncfm_keras as nk

    if os.path.exists(os.path.join(directory, "t10k-labels-idx1-ubyte.gz")):
        return
    full = nk.load_dataset("fashion_mnist", FLAGS.data_dir)
    x, y = full.x_train[..., 0], full.y_train
    if pad:
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    os.makedirs(directory, exist_ok=True)
    train = np.concatenate([np.flatnonzero(y == c)[:1000] for c in range(10)])
    splits = {"train": (x[train], y[train])}
    if test:
        splits["t10k"] = (full.x_test[..., 0], full.y_test)
    else:
        held_out = np.concatenate([np.flatnonzero(y == c)[1000:2000] for c in range(10)])
        splits["t10k"] = (x[held_out], y[held_out])
    for name, (images, labels) in splits.items():
        side = images.shape[1]
        with gzip.open(os.path.join(directory, f"{name}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(images), side, side) + images.tobytes())
        with gzip.open(os.path.join(directory, f"{name}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def run(script, args, log):
    """Runs `script` with `args`, its output into `log`; the seconds it took."""
    start = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, os.path.join(ROOT, script), *args], stdout=f,
                       stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return round(time.time() - start, 1)


def official_set(path, out):
    """The official set as a distilled-set file of the 28x28 split (the documented format)."""
    import ncfm_keras as nk

    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
        mean, std = np.float32([f["mean"]]), np.float32([f["std"]])
        ipc, factor = int(f["ipc"]), int(f["factor"])
    nk.save_distilled(out, nk.DistilledSet(
        images.astype(np.float32), labels.astype(np.int32), ipc, factor, "fashion_mnist",
        nk.MNIST_FAMILY["fashion_mnist"], mean, std, {"source": path}))


def finished(out):
    """Whether the cell in `out` has a complete evaluation (evaluate.py rewrites its file after
    every network, with `complete` false until the last)."""
    path = os.path.join(out, "evaluation.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)["complete"]


def run_cell(cell, seed, data_dirs, pools):
    out = os.path.join(FLAGS.work_dir, cell, f"seed{seed}")
    if finished(out):
        return
    os.makedirs(out, exist_ok=True)
    timing = {}
    if cell == OFFICIAL:
        data_dir = data_dirs["native"]
        official_set(FLAGS.official, os.path.join(out, "distilled.npz"))
    else:
        geometry, settings, _ = CELLS[cell]
        data_dir = data_dirs[geometry]
        flags_of_cell = [f"--{k}={v}" for k, v in settings.items()]
        timing["distill_seconds"] = run("train.py", [
            *B0, f"--seed={seed}", f"--data_dir={data_dir}", f"--pool_dir={pools}",
            f"--output_dir={out}", "--noresume", *flags_of_cell], os.path.join(out, "train.log"))
    timing["evaluate_seconds"] = run("evaluate.py", [
        f"--distilled={os.path.join(out, 'distilled.npz')}", f"--data_dir={data_dir}",
        f"--epochs={FLAGS.epochs}", f"--repeats={FLAGS.repeats}", "--seed=0",
        f"--output_dir={out}"], os.path.join(out, "evaluate.log"))
    timing["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                      text=True, cwd=ROOT).stdout.strip()
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump(timing, f)


def matching_diagnostic(out):
    """The matching loss per class, mean of the first and of the last 10 iterations."""
    path = os.path.join(out, "metrics.csv")
    if not os.path.exists(path):
        return None
    table = np.genfromtxt(path, delimiter=",", names=True)
    loss = table["matching_loss"] / 10  # metrics.csv sums the 10 classes
    return float(np.mean(loss[:10])), float(np.mean(loss[-10:]))


def split_cells():
    """The cells of --split: all on the validation split, `defaults` (this checkout's) and
    `official` on the test split."""
    if FLAGS.split == "test":
        return [HELD_OUT, OFFICIAL]
    return [*CELLS, OFFICIAL]


def table():
    """The Markdown table of the finished cells."""
    rows, official, missing = [], None, []
    for cell in split_cells():
        finals, seeds, losses = [], [], []
        for seed in (FLAGS.seeds if cell != OFFICIAL else ["0"]):
            out = os.path.join(FLAGS.work_dir, cell, f"seed{seed}")
            if not finished(out):
                missing.append(f"{cell} seed {seed}")
                continue
            with open(os.path.join(out, "evaluation.json")) as f:
                runs = json.load(f)["archs"]["convnet"]["runs"]
            finals += [r["final"] for r in runs]
            seeds.append(f"{np.mean([r['final'] for r in runs]):.2f}")
            losses.append(matching_diagnostic(out))
        if not finals:
            continue
        mean, std = float(np.mean(finals)), float(np.std(finals))
        if cell == OFFICIAL:
            official = (mean, std)
        loss = [x for x in losses if x is not None]
        loss_text = (f"{np.mean([a for a, _ in loss]):.1f} → {np.mean([b for _, b in loss]):.1f}"
                     if loss else "22.3 → 12.2 (its run)")
        what = CELLS[cell][2] if cell in CELLS else "the official code's own set (gszfwsb/NCFM)"
        rows.append((cell, what, mean, std, len(finals), " / ".join(seeds), loss_text))
    lines = [f"| cell | what | {FLAGS.split} accuracy (%) | networks | per seed | matching loss "
             "per class (first → last 10 it.) | vs official |", "|---|---|---|---|---|---|---|"]
    for cell, what, mean, std, n, seeds, loss_text in rows:
        versus = ""
        if official is not None and cell != OFFICIAL:
            spread = float(np.hypot(std, official[1]))
            versus = f"{mean - official[0]:+.2f} (spread {spread:.2f})"
        lines.append(f"| {cell} | {what} | {mean:.2f} ± {std:.2f} | {n} | {seeds} | {loss_text} "
                     f"| {versus} |")
    if missing:
        lines.append(f"\nNot yet run: {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv):
    del argv
    name = "ablation_b0"
    if FLAGS.split == "test":
        name = "equal_budget_b0"
    if FLAGS.work_dir is None:
        FLAGS.work_dir = os.path.join(ROOT, "results", name)
    if FLAGS.table_path is None:
        FLAGS.table_path = os.path.join(ROOT, "results", f"{name}.md")
    if FLAGS.epochs is None:
        FLAGS.epochs = 300 if FLAGS.split == "test" else 100
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    data_dirs = {geometry: os.path.join(FLAGS.scratch_dir, "data", FLAGS.split, geometry)
                 for geometry in ("native", "padded")}
    pools = os.path.join(FLAGS.scratch_dir, "pools")
    if not FLAGS.table:
        for geometry, directory in data_dirs.items():
            write_split(directory, pad=geometry == "padded", test=FLAGS.split == "test")
        cells = FLAGS.only or split_cells()
        unknown = [c for c in cells if c not in split_cells()]
        if unknown:
            sys.exit(f"error: no cell {unknown[0]} on the {FLAGS.split} split; use "
                     f"{', '.join(split_cells())}")
        for cell in cells:
            for seed in (FLAGS.seeds if cell != OFFICIAL else ["0"]):
                print(f"{time.strftime('%H:%M:%S')} {cell} seed {seed}", flush=True)
                run_cell(cell, seed, data_dirs, pools)
    text = table()
    title = "Ablation at budget B0 (Fashion-MNIST IPC 10, validation split)"
    if FLAGS.split == "test":
        title = "The held-out equal-budget check at B0 (Fashion-MNIST IPC 10, test split)"
    with open(FLAGS.table_path, "w") as f:
        f.write(f"# {title}\n\n"
                f"Made by `python benchmarks/ablation_b0.py` (its docstring states the budget). "
                f"Evaluation: ncfm protocol, {FLAGS.epochs} epochs, {FLAGS.repeats} ConvNet-3s "
                f"per set; mean ± std over all networks of all distillation seeds "
                f"({', '.join(FLAGS.seeds)}); 'per seed' gives each seed's mean. 'vs official': "
                "the difference to the official set and the combined spread √(s₁² + s₂²).\n\n"
                f"{text}\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
