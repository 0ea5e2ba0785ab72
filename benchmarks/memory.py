"""Peak memory of a few compiled NCFM iterations at the shapes of the `cifar10` and
`cifar100` presets, each configuration in a fresh process, for comparison with the paper's
Table 3 and with an 11 GB GPU (a 2080 Ti).

    python benchmarks/memory.py                # the six configurations, 2 steps each
    python benchmarks/memory.py --configs=cifar100_ipc10_psi_off,cifar100_ipc10_psi_on \\
        --steps=5

Configurations: CIFAR-10 at IPC 10 (batch_real 1024, the preset's) and CIFAR-100 at IPC 10 and
IPC 50 (batch_real 256), each with psi off and on. The data are random uint8 images of 32x32x3,
as many per class as the mix init needs; the distillation settings are the preset's
(`nk.preset`: 4096 frequencies, factor 2, calibration on, per-class image steps), with a pool
of one member and no pretraining (memory does not depend on the pool's weights); the precision
and XLA are what `train.py` picks for the device (`nk.set_precision("auto")`,
`nk.build_distiller` with `jit_compile="auto"`). Each configuration runs --steps `fit` steps in
its own subprocess, so its peak is its own, and prints one row:

    config                 batch_real  precision      xla    before  peak
    cifar100_ipc10_psi_off        256  mixed_float16  True   N MiB   M MiB (G GiB)

How to read it. On a GPU, `peak` is TensorFlow's peak allocation on GPU:0
(`tf.config.experimental.get_memory_info`, over the whole process: the model, the pool, the set
and the steps) and `before` what was allocated just before the first step. Compare `peak` with
Table 3 of the paper (A100: 1.4 GB for CIFAR-100 IPC 10 without psi, 1.6 GB with) and with the
11 GB of a 2080 Ti. On a CPU there is no device memory: both columns are the process's peak
resident memory on the host (RSS, `ru_maxrss`), which includes TensorFlow itself and the data;
`before` is the peak before the first step, so `peak - before` is roughly what the steps add.
These are NOT GPU figures and do not compare with Table 3. A configuration that fails (out of
memory, say) prints the last line of its error and the script exits non-zero at the end.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import ncfm_keras as nk  # noqa: E402

SHAPES = (("cifar10", 10), ("cifar100", 10), ("cifar100", 50))  # the presets measured
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CONFIGS = {f"{dataset}_ipc{ipc}_psi_{psi}": (dataset, ipc, psi == "on")
           for dataset, ipc in SHAPES for psi in ("off", "on")}

flags.DEFINE_integer("steps", 2, "Compiled steps per configuration.", lower_bound=1)
flags.DEFINE_list("configs", list(CONFIGS), "The configurations to measure, comma-separated: "
                  f"{', '.join(CONFIGS)}.")
flags.register_validator("configs", lambda names: set(names) <= set(CONFIGS),
                         f"use a comma list of {', '.join(CONFIGS)}")
flags.DEFINE_enum("config", None, list(CONFIGS), "Measure only this configuration, in this "
                  "process (by default each runs in a fresh subprocess).")
FLAGS = flags.FLAGS

COLUMNS = "{:<23} {:>10}  {:<14} {:<6} {:>9}  {}"
CPU_NOTE = ("No GPU: these are peak resident memory (RSS) of each process on the host, "
            "TensorFlow and the data included,\nNOT GPU figures; they do not compare with "
            "Table 3 of the paper (1.4 / 1.6 GB, A100) or with a GPU's memory.")
GPU_NOTE = ("peak: TensorFlow's peak allocation on GPU:0. The paper's Table 3 (A100): "
            "CIFAR-100 IPC 10 1.4 GB without psi,\n1.6 GB with; a 2080 Ti has 11 GB.")


def mib(size):
    return f"{size / 2**20:.0f} MiB"


def memory(gpu):
    """(current, peak) bytes on GPU:0; on a CPU the process's peak RSS twice (ru_maxrss is KiB
    on Linux)."""
    if gpu:
        info = tf.config.experimental.get_memory_info("GPU:0")
        return info["current"], info["peak"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, rss


def random_data(dataset, per_class):
    """A `Dataset` of random 32x32x3 uint8 images, `per_class` a class, CIFAR's statistics."""
    k = NUM_CLASSES[dataset]
    x = np.random.default_rng(0).integers(0, 256, (k * per_class, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(k, dtype=np.int32), per_class)
    mean, std = (np.float32(s) for s in nk.CIFAR_STATISTICS)
    return nk.Dataset(f"random_{dataset}", x, y, x[:k], y[:k], [str(c) for c in range(k)],
                      mean, std)  # the test split: a token, never read


def measure(name, steps):
    """Runs `steps` compiled steps of configuration `name`; prints its row's values as JSON."""
    dataset, ipc, psi = CONFIGS[name]
    gpus = tf.config.list_physical_devices("GPU")
    precision = nk.set_precision("auto")
    config = dataclasses.replace(nk.preset(dataset, ipc), sampling_net=psi, num_pretrained=1,
                                 pretrain_epochs=0)
    data = random_data(dataset, ipc * config.factor ** 2)  # what the mix init takes
    with tempfile.TemporaryDirectory() as pool_dir:
        model = nk.build_distiller(data, config, pool_dir, jit_compile="auto", verbose=0)
    real = nk.class_balanced_batches(data, config.batch_real, config.seed)
    before, _ = memory(gpus)
    model.fit(real, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)  # as train.py
    _, peak = memory(gpus)
    print(json.dumps(dict(batch_real=config.batch_real, precision=precision,
                          xla=bool(model.jit_compile), before=before, peak=peak,
                          gpu=bool(gpus))))


def main(argv):
    if FLAGS.config is not None:
        measure(FLAGS.config, FLAGS.steps)
        return
    print(COLUMNS.format("config", "batch_real", "precision", "xla", "before", "peak"),
          flush=True)
    notes, failed = set(), []
    for name in FLAGS.configs:  # each in a fresh process: its own peak
        command = [sys.executable, os.path.abspath(__file__), f"--config={name}",
                   f"--steps={FLAGS.steps}"]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            error = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{name:<23} failed (exit {child.returncode}): {error}", flush=True)
            failed.append(name)
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        peak = f"{mib(row['peak'])} ({row['peak'] / 2**30:.2f} GiB)"
        print(COLUMNS.format(name, row["batch_real"], row["precision"], str(row["xla"]),
                             mib(row["before"]), peak), flush=True)
        notes.add(GPU_NOTE if row["gpu"] else CPU_NOTE)
    print("\n".join(sorted(notes)))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    app.run(main)
