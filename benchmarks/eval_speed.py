"""Times the evaluation loop: seconds per epoch of the ncfm protocol on 400 images (IPC 10 at
factor 2, as evaluate.py trains on a decoded Fashion-MNIST set), for this checkout and, with
--before, for another checkout's `ncfm_keras.py` in the same process, beside the floor: the
same ConvNet-3's plain Keras training step on the same batches, without augmentation.

    python benchmarks/eval_speed.py --before=/path/to/an/older/checkout
    python benchmarks/eval_speed.py --epochs=30 --rounds=3
    python benchmarks/eval_speed.py --precisions=float32,mixed_bfloat16   # evaluate.py --precision

Each round trains one fresh network per variant for --epochs epochs (in turn, so that a
machine's drift hits every variant alike) and keeps the median epoch time after the first
(which traces the step); a variant's figure is the median over rounds. The test split is not
tested during the timed epochs. The official code's figure on this kind of CPU, same
configuration, is 2.02 s/epoch (measured once, not re-run here). Run it alone on the machine.
"""

import dataclasses
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import ncfm_keras as nk  # noqa: E402

flags.DEFINE_string("before", None, "A checkout whose ncfm_keras.py is timed beside this one.")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files.")
flags.DEFINE_integer("epochs", 20, "Epochs per timed network.")
flags.DEFINE_integer("rounds", 3, "Networks per variant.")
flags.DEFINE_list("precisions", ["float32"], "Keras dtype policies this checkout is timed in "
                  "(evaluate.py --precision); the floor and --before run in float32.")
FLAGS = flags.FLAGS
OFFICIAL_SECONDS_PER_EPOCH = 2.02


class EpochTimes(keras.callbacks.Callback):
    """The seconds of every epoch, in `seconds`."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self.start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    modules = {}
    if FLAGS.before:
        modules["before"] = load_module("ncfm_before", os.path.join(FLAGS.before,
                                                                   "ncfm_keras.py"))
    data = nk.load_dataset("fashion_mnist", FLAGS.data_dir)
    x, y = nk.random_subset(data, ipc=40, seed=0)  # 400 float images, as a decoded set
    protocol = dataclasses.replace(nk.PROTOCOLS["ncfm"], epochs=FLAGS.epochs)
    print(f"ncfm protocol, {len(x)} images {x.shape[1:]}, batch {protocol.batch_size}, "
          f"{FLAGS.epochs} epochs x {FLAGS.rounds} rounds; {tf.config.list_physical_devices()}")

    def protocol_epoch(module, precision="float32"):
        keras.mixed_precision.set_global_policy(precision)
        net = module.build_network("convnet", data.image_shape, 10, data.mean, data.std)
        times = EpochTimes()
        module.train_network(net, x, y, 10, protocol, seed=0, callbacks=[times],
                             mean=data.mean, std=data.std)
        keras.mixed_precision.set_global_policy("float32")
        return statistics.median(times.seconds[1:])

    def floor_epoch():
        net = nk.build_network("convnet", data.image_shape, 10, data.mean, data.std)
        net.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        targets = np.eye(10, dtype=np.float32)[y]
        batches = (tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(len(x), seed=0)
                   .batch(protocol.batch_size).repeat().prefetch(tf.data.AUTOTUNE))
        times = EpochTimes()
        steps = -(-len(x) // protocol.batch_size)
        net.fit(batches, epochs=FLAGS.epochs, steps_per_epoch=steps, callbacks=[times],
                verbose=0, shuffle=False)
        return statistics.median(times.seconds[1:])

    variants = {"before": lambda: protocol_epoch(modules["before"])} if FLAGS.before else {}
    for precision in FLAGS.precisions:
        variants[f"this checkout, {precision}"] = lambda p=precision: protocol_epoch(nk, p)
    variants["floor: plain Keras step, no augmentation"] = floor_epoch
    seconds = {name: [] for name in variants}
    for _ in range(FLAGS.rounds):
        for name, fn in variants.items():
            seconds[name].append(fn())
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name}: {median:.3f} s/epoch (rounds: {', '.join(f'{v:.3f}' for v in values)})"
              f"  official {OFFICIAL_SECONDS_PER_EPOCH} / this = "
              f"{OFFICIAL_SECONDS_PER_EPOCH / median:.2f}x")


if __name__ == "__main__":
    app.run(main)
