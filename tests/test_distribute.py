"""Multi-device distillation (`tf.distribute.MirroredStrategy`) on two logical CPU devices.

TensorFlow fixes its logical devices when it starts, so each check runs in a subprocess that
splits the CPU first (`ncfm_keras.split_cpu`).
"""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import FASHION_MNIST_DIR
from test_cli import FMNIST, assert_clean_error, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One step of the same model (psi on, calibration on, one class per group) with one device and
# with two, from the same initial state and real batch. Prints what the test compares as JSON.
STEPS = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import ncfm_keras as nk
nk.split_cpu(2)
import keras, tensorflow as tf

full = nk.load_dataset("fashion_mnist", sys.argv[2])
keep = np.concatenate([np.flatnonzero(full.y_train == c)[:100] for c in range(10)])
data = nk.Dataset(full.name, full.x_train[keep], full.y_train[keep], full.x_test[:10],
                  full.y_test[:10], full.class_names, full.mean, full.std)
# One step on the summed loss is the same on any number of devices; per-class steps are not
# (each device steps its own classes, K/R steps, as the official data parallelism does).
config = nk.DistillConfig(ipc=1, batch_real=8, num_freqs=64, num_pretrained=2,
                          pretrain_epochs=0, image_lr=0.01, sampler_lr=0.01,
                          sampling_net=True, image_steps="summed")


def distil(strategy, poison_class=None, config=config):
    model = nk.build_distiller(data, config, sys.argv[3], jit_compile=False, verbose=0,
                               strategy=strategy)
    if poison_class is not None:  # NaN pixels in one class: one replica's part is not finite
        images = model.synthetic.numpy()
        images[poison_class] = np.nan
        model.synthetic.assign(images)
    before = model.synthetic.numpy()
    history = model.fit(nk.class_balanced_batches(data, config.batch_real), epochs=1,
                        steps_per_epoch=1, verbose=0).history
    return dict(before=before.tolist(), images=model.synthetic.numpy().tolist(),
                psi=[w.numpy().tolist() for w in model.sampler.weights],
                iteration=int(model.iteration.numpy()),
                image_steps=int(model.optimizer.iterations.numpy()),
                logs={k: float(v[-1]) for k, v in history.items()})


mirrored = nk.mirrored_strategy()
per_class = dict(config=config.__class__(**{**config.__dict__, "image_steps": "per_class"}))
print(json.dumps(dict(replicas=mirrored.num_replicas_in_sync, one=distil(None),
                      two=distil(mirrored), poisoned=distil(mirrored, poison_class=7),
                      per_class=distil(mirrored, **per_class))))
"""


def test_two_devices_give_the_single_device_step(tmp_path):
    result = subprocess.run([sys.executable, "-c", STEPS, ROOT, FASHION_MNIST_DIR,
                             str(tmp_path / "pools")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    one, two = out["one"], out["two"]
    np.testing.assert_array_equal(one["before"], two["before"])
    moved = np.abs(np.subtract(one["images"], one["before"])).max()
    assert moved > 1e-3  # the step did something ...
    # ... and the same on two devices, up to float32 summation order. (Over several steps
    # with psi the two drift apart faster: psi's gradient passes through the CF loss's square
    # roots near zero, which amplify rounding; the same happens on one device when the
    # class groups change.)
    # Adam's first step is lr * g / (|g| + eps) per pixel, so where a gradient is near eps its
    # rounding shows: allow 10 % of a step (lr 0.01) anywhere, 1e-5 on 99 % of the pixels
    # (measured with psi bounded by 2: max 3.2e-4, 0.27 % of the pixels above 1e-5).
    difference = np.abs(np.subtract(two["images"], one["images"]))
    assert difference.max() < 1e-3 and np.mean(difference > 1e-5) < 1e-2, (
        difference.max(), np.mean(difference > 1e-5))
    for w1, w2 in zip(one["psi"], two["psi"]):
        w1, w2 = np.asarray(w1), np.asarray(w2)
        assert np.linalg.norm(w2 - w1) <= 1e-5 * np.linalg.norm(w1) + 1e-6
    assert one["iteration"] == two["iteration"] == 1
    for key in ("matching_loss", "sampler_loss", "calibration_loss", "image_grad_norm"):
        np.testing.assert_allclose(two["logs"][key], one["logs"][key], rtol=1e-5)

    # A non-finite part on one replica (class 7 lives on the second) skips the update on
    # both: the first replica's classes do not move either.
    poisoned = out["poisoned"]
    np.testing.assert_array_equal(np.asarray(poisoned["images"])[:5],
                                  np.asarray(poisoned["before"])[:5])
    assert poisoned["logs"]["nonfinite_steps"] == 3  # psi, matching and calibration

    # Per-class steps on two devices: each steps its 5 classes, for matching and calibration.
    per_class = out["per_class"]
    assert per_class["image_steps"] == 2 * 5 and per_class["iteration"] == 1
    assert np.abs(np.subtract(per_class["images"], per_class["before"])).max() > 1e-3
    assert all(np.isfinite(v) for v in per_class["logs"].values())


def test_train_py_mirrored_matches_default(tmp_path):
    common = [*FMNIST, "--ipc=1", "--iterations=3", "--log_every=1", "--batch_real=8",
              "--num_freqs=64", "--num_pretrained=1", "--pretrain_epochs=0",
              "--sampling_net=false", "--image_steps=summed", "--deterministic",
              f"--pool_dir={tmp_path / 'pools'}"]
    single = run("train.py", *common, f"--output_dir={tmp_path / 'one'}")
    mirrored = run("train.py", *common, "--strategy=mirrored", "--cpu_devices=2",
                   f"--output_dir={tmp_path / 'two'}")
    for result in (single, mirrored):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "2 replicas (MirroredStrategy)" in mirrored.stdout
    with np.load(tmp_path / "one" / "distilled.npz") as a, \
            np.load(tmp_path / "two" / "distilled.npz") as b:
        difference = np.abs(b["images"] - a["images"])  # as in the test above
        assert difference.max() < 1e-3 and np.mean(difference > 1e-5) < 1e-3, difference.max()
    assert ((tmp_path / "one" / "metrics.csv").read_text().splitlines()[0] ==
            (tmp_path / "two" / "metrics.csv").read_text().splitlines()[0])


def test_mirrored_bad_input(tmp_path):
    common = [*FMNIST, f"--output_dir={tmp_path / 'out'}", f"--pool_dir={tmp_path / 'pools'}"]
    assert_clean_error(run("train.py", *common, "--strategy=mirrored", "--cpu_devices=3"),
                       "3 devices cannot share 10 classes evenly")
    assert_clean_error(run("train.py", *common, "--strategy=mirrored", "--jit_compile=true"),
                       "--jit_compile=true cannot be combined with --strategy=mirrored")
    assert_clean_error(run("train.py", *common, "--strategy=ring"), "--strategy=ring")
    assert not os.path.exists(tmp_path / "out")
