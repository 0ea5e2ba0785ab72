"""The validation table of the faithful-dynamics choices, at the budget B0, in one command.

    python benchmarks/validation_b0.py --work_dir=/tmp/b0            # every cell (hours on a CPU)
    python benchmarks/validation_b0.py --work_dir=/tmp/b0 --only=per_class,summed

Budget B0 (Fashion-MNIST IPC 10): a pool of 2 ConvNets x 2 epochs on a class-balanced
10 000-image training subset (the first 1000 images of each class), 100 iterations, batch_real
256, 4096 frequencies, psi off, calibration on, AdamW 1e-3, seed 0. Every set is evaluated on a
**validation split** that distillation never sees — the next 1000 training images of each class
— never on the test split: `evaluate.py` with the ncfm protocol, `--epochs` epochs, 3 networks.

Cells (each a directory of --work_dir; a finished cell is reused):
  init                  the run's own initialisation (init=mix, seed 0), not distilled
  per_class             the defaults: one image step per class, DSA in normalised space
  summed                --image_steps=summed
  pixel                 --dsa_space=pixel
  psi                   --sampling_net=true
  per_class_teacher     the per_class set, soft labels: official teacher recipe
  per_class_per_batch   the per_class set, soft labels: teacher on every augmented batch
  random_hard / random_teacher / random_per_batch: a random real subset under the same labels
"""

import gzip
import json
import os
import struct
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_string("work_dir", "b0", "Where the data split, sets and evaluations go.")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_list("only", None, "Run only these cells (default: all).")
flags.DEFINE_integer("epochs", 100, "Evaluation epochs.")
FLAGS = flags.FLAGS

B0 = ["--dataset=fashion_mnist", "--ipc=10", "--iterations=100", "--num_pretrained=2",
      "--pretrain_epochs=2", "--batch_real=256", "--num_freqs=4096", "--sampling_net=false",
      "--calibration=1", "--image_lr=1e-3", "--seed=0", "--log_every=10"]
DISTILLED = {"per_class": [], "summed": ["--image_steps=summed"],
             "pixel": ["--dsa_space=pixel"], "psi": ["--sampling_net=true"]}
# Soft labels keep the official 5 % of the epochs on hard labels (101 of 2000).
SOFT = {"hard": [], "teacher": ["--labels=teacher", "--hard_label_epochs=5"],
        "per_batch": ["--labels=teacher_per_batch", "--hard_label_epochs=5"]}
CELLS = {"init": ("init", "hard"), **{name: (name, "hard") for name in DISTILLED},
         **{f"{source}_{labels}": (source, labels) for source in ("per_class", "random")
            for labels in SOFT if (source, labels) != ("per_class", "hard")}}


def write_split(directory):
    """IDX files: train = first 1000 training images per class, t10k = the next 1000."""
    import numpy as np

    import ncfm_keras as nk

    if os.path.exists(os.path.join(directory, "t10k-labels-idx1-ubyte.gz")):
        return
    full = nk.load_dataset("fashion_mnist", FLAGS.data_dir)
    x, y = full.x_train[..., 0], full.y_train  # 28x28
    os.makedirs(directory, exist_ok=True)
    for name, (lo, hi) in (("train", (0, 1000)), ("t10k", (1000, 2000))):
        idx = np.concatenate([np.flatnonzero(y == c)[lo:hi] for c in range(10)])
        with gzip.open(os.path.join(directory, f"{name}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(idx), 28, 28) + x[idx].tobytes())
        with gzip.open(os.path.join(directory, f"{name}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, len(idx)) + y[idx].astype(np.uint8).tobytes())


def run(script, args, log):
    with open(log, "w") as f:
        subprocess.run([sys.executable, os.path.join(ROOT, script), *args], stdout=f,
                       stderr=subprocess.STDOUT, check=True, cwd=ROOT)


def init_set(data_dir, path):
    """The B0 run's initialisation as a distilled-set file."""
    import dataclasses

    import numpy as np

    import ncfm_keras as nk

    data = nk.load_dataset("fashion_mnist", data_dir)
    config = nk.DistillConfig(ipc=10, num_pretrained=2, pretrain_epochs=2, sampling_net=False)
    images = nk.initial_images(data, config.ipc, config.factor, config.init, config.seed,
                               config.init_from, config.init_resize)
    nk.save_distilled(path, nk.DistilledSet(
        images, np.repeat(np.arange(10), 10).astype(np.int32), 10, config.factor, data.name,
        data.class_names, data.mean, data.std, dataclasses.asdict(config),
        data_dir=data.data_dir, data_digest=data.digest))


def main(argv):
    del argv
    work = os.path.abspath(FLAGS.work_dir)
    data_dir, pools = os.path.join(work, "data"), os.path.join(work, "pools")
    write_split(data_dir)
    common = [f"--data_dir={data_dir}", f"--epochs={FLAGS.epochs}", "--repeats=3",
              f"--pool_dir={pools}"]
    rows = []
    for cell, (source, labels) in CELLS.items():
        out = os.path.join(work, cell)
        result = os.path.join(out, "evaluation.json")
        if (FLAGS.only is None or cell in FLAGS.only) and not os.path.exists(result):
            os.makedirs(out, exist_ok=True)
            teacher = os.path.join(work, "per_class", "distilled.npz")
            if source == "init":
                init_set(data_dir, os.path.join(out, "distilled.npz"))
            elif source in DISTILLED and labels == "hard":
                run("train.py", [*B0, f"--data_dir={data_dir}", f"--pool_dir={pools}",
                                 f"--output_dir={out}", *DISTILLED[source]],
                    os.path.join(out, "distil.log"))
            if source == "random":
                args = ["--dataset=fashion_mnist", "--baseline=random", "--ipc=10"] + (
                    [f"--teacher_of={teacher}"] if labels != "hard" else [])
            else:
                args = [f"--distilled={os.path.join(work, source, 'distilled.npz')}"]
            run("evaluate.py", [*common, *args, *SOFT[labels], f"--output_dir={out}"],
                os.path.join(out, "evaluate.log"))
        if os.path.exists(result):
            with open(result) as f:
                summary = json.load(f)["archs"]["convnet"]["summary"]["final"]
            rows.append(f"| {cell} | {summary[0]:.2f} ± {summary[1]:.2f} |")
    print("| cell (B0, Fashion-MNIST IPC 10) | validation accuracy (%, 3 ConvNets) |\n|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
