"""SIGKILLs one `train.py --deterministic` run at --kills moments and re-runs it each time.

    python benchmarks/kill_stress.py                  # tiny Fashion-MNIST settings, 10 kills
    python benchmarks/kill_stress.py --kills=3 --seed=1 --work_dir=/tmp/stress

The data: a small image folder of Fashion-MNIST images (so that the pool pretrains in
seconds). First an uninterrupted reference run (its own pool directory), then the stressed run
(another pool directory, so that its pool is pretrained again and can be killed too). Kill 1
falls during the pool pretraining, kill 2 while `checkpoint.npz` is being written (its
temporary file exists), the others at moments drawn uniformly from the start of a run to eight
epochs past its first checkpoint (as timed in the reference run). After every kill every
.npz/.json/.csv in the output and pool directories must be readable. The run is then finished
without a kill; its distilled set must equal the reference's bit for bit. Prints one line per
kill and a summary (leftover_tmp: temporary files of killed writes still on disk at the end):

    resumes=R unreadable=U leftover_tmp=T max|delta|=D identical=yes|no
"""

import csv
import json
import os
import random
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("kills", 10, "SIGKILLs of the stressed run.")
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_string("work_dir", "/tmp/ncfm_kill_stress", "Where the runs go (emptied first).")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_integer("iterations", 60, "Iterations of the run.")
flags.DEFINE_integer("per_class", 300, "Fashion-MNIST images per class in the run's folder "
                     "dataset (a fifth of them held out as its test split).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = None  # the folder dataset, made by main()


def small_folder(root, per_class):
    """The first `per_class` Fashion-MNIST training images of each class as an image folder:
    small enough that pretraining the pool takes seconds, not minutes."""
    import numpy as np
    from PIL import Image

    import ncfm_keras as nk

    data = nk.load_dataset("fashion_mnist", FLAGS.data_dir)
    for c, name in enumerate(data.class_names):
        folder = os.path.join(root, f"{c}_{name.replace('/', '_')}")
        os.makedirs(folder)
        for i in np.flatnonzero(data.y_train == c)[:per_class]:
            Image.fromarray(data.x_train[i, ..., 0]).save(os.path.join(folder, f"{i}.png"))
    return root


def command(out, pools):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset=folder:{DATA}",
            "--ipc=1", f"--iterations={FLAGS.iterations}",
            "--log_every=2", "--batch_real=16", "--num_freqs=256", "--num_pretrained=2",
            "--pretrain_epochs=1", "--init=real", "--deterministic", f"--pool_dir={pools}",
            f"--output_dir={out}"]


def unreadable(directories):
    """Every .npz/.json/.csv below `directories` that cannot be read completely."""
    import numpy as np

    import ncfm_keras as nk
    import runs

    bad = []
    for directory in directories:
        for parent, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(parent, name)
                try:
                    if name == "checkpoint.npz":
                        runs.load_checkpoint(path)
                    elif name == "distilled.npz":
                        nk.load_distilled(path)
                    elif name.endswith(".npz"):
                        with np.load(path) as f:
                            [f[k] for k in f.files]
                    elif name.endswith(".json"):
                        with open(path) as f:
                            json.load(f)
                    elif name.endswith(".csv"):
                        with open(path) as f:
                            rows = list(csv.reader(f))
                        assert rows and all(len(r) == len(rows[0]) for r in rows)
                        [float(v) for r in rows[1:] for v in r if v]
                except Exception as e:  # anything at all is a failure here
                    bad.append(f"{path}: {type(e).__name__}: {e}")
    return bad


def temporaries(directories):
    return [os.path.join(p, n) for d in directories for p, _, names in os.walk(d)
            for n in names if n.endswith(".tmp")]


def killed_run(args, out, log_path, moment, delay):
    """Starts a run and SIGKILLs it at `moment` ("pool", "checkpoint" or "random" after
    `delay` s). Returns (what the moment really was, seconds after start, exited early)."""
    old = set(temporaries([out]))
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
    start = time.time()

    def text():
        with open(log_path) as f:
            return f.read()

    while process.poll() is None:
        now = time.time() - start
        if moment == "pool" and "distilling " in text() and now > delay:
            break
        if moment == "checkpoint" and any(os.path.basename(t).startswith(".checkpoint.npz")
                                          for t in set(temporaries([out])) - old):
            break
        if moment == "random" and now > delay:
            break
        time.sleep(0.005)
    seconds = time.time() - start
    if process.poll() is not None:
        return "finished before the kill", seconds, True
    writing = bool(set(temporaries([out])) - old)
    process.kill()
    process.wait()
    log = text()
    where = ("pool pretraining" if "distilling " in log and "pool ready" not in log else
             "before the pool" if "pool ready" not in log else "distillation")
    return where + (", during a write" if writing else ""), seconds, False


def main(argv):
    del argv
    import shutil

    import numpy as np

    import ncfm_keras as nk
    import runs

    rng = random.Random(FLAGS.seed)
    shutil.rmtree(FLAGS.work_dir, ignore_errors=True)
    os.makedirs(FLAGS.work_dir)
    ref, out = (os.path.join(FLAGS.work_dir, d) for d in ("reference", "stressed"))
    ref_pools, pools = (os.path.join(FLAGS.work_dir, d) for d in ("pools_ref", "pools"))
    global DATA
    DATA = small_folder(os.path.join(FLAGS.work_dir, "data"), FLAGS.per_class)

    start = time.time()
    process = subprocess.Popen(command(ref, ref_pools), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while not os.path.exists(os.path.join(ref, "checkpoint.npz")) and process.poll() is None:
        time.sleep(0.01)
    first = time.time() - start
    stdout, stderr = process.communicate()
    duration = time.time() - start
    if process.returncode:
        sys.exit(f"the reference run failed:\n{stderr[-3000:]}")
    pool = float(re.search(r"pool ready \((\d+) s\)", stdout)[1])
    per_iteration = float(re.search(r"([\d.]+) s/iter", stdout)[1])
    # From a start with the pool cached to eight epochs past the first checkpoint.
    window = first - pool + 8 * 2 * per_iteration
    print(f"reference run: {duration:.0f} s (pool {pool:.0f} s, first checkpoint after "
          f"{first:.0f} s); random kills within {window:.0f} s of a start", flush=True)

    moments = ["pool", "checkpoint"] + ["random"] * (FLAGS.kills - 2)
    resumes = bad_count = 0
    for i, moment in enumerate(moments[:FLAGS.kills]):
        log_path = os.path.join(FLAGS.work_dir, f"kill{i + 1:02d}.log")
        where, seconds, finished = killed_run(command(out, pools), out, log_path, moment,
                                              rng.uniform(0, window if moment == "random"
                                                          else 3))
        with open(log_path) as f:
            resumes += "resuming from iteration" in f.read()
        bad = unreadable([out, pools])
        bad_count += len(bad)
        done = (runs.load_checkpoint(os.path.join(out, "checkpoint.npz"))["epochs_done"] * 2
                if os.path.exists(os.path.join(out, "checkpoint.npz")) else 0)
        print(f"kill {i + 1}: {moment} -> {where} at {seconds:.1f} s; checkpoint at iteration "
              f"{done}; unreadable {len(bad)}{''.join(chr(10) + '  ' + b for b in bad)}",
              flush=True)
        if finished:
            break
    final_log = os.path.join(FLAGS.work_dir, "final.log")
    with open(final_log, "w") as log:
        final = subprocess.run(command(out, pools), stdout=log, stderr=subprocess.STDOUT)
    with open(final_log) as f:
        resumes += "resuming from iteration" in f.read()
    if final.returncode:
        sys.exit(f"the final run failed; see {final_log}")
    bad = unreadable([out, pools])
    bad_count += len(bad)
    a = nk.load_distilled(os.path.join(ref, "distilled.npz")).images
    b = nk.load_distilled(os.path.join(out, "distilled.npz")).images
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = [int(float(r.split(",")[0])) for r in f.read().splitlines()[1:]]
    print(f"metrics.csv iterations 1..{FLAGS.iterations} once each: "
          f"{rows == list(range(1, FLAGS.iterations + 1))}")
    print(f"resumes={resumes} unreadable={bad_count} "
          f"leftover_tmp={len(temporaries([out, pools]))} "
          f"max|delta|={float(np.max(np.abs(a - b))):.3g} "
          f"identical={'yes' if np.array_equal(a, b) else 'no'}")


if __name__ == "__main__":
    app.run(main)
