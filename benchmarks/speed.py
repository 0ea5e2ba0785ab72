"""Times one compiled NCFM iteration against the bare network work it contains, with one image
step per class (the default) and with one step on the summed loss.

    python benchmarks/speed.py                # the issue's configuration (Fashion-MNIST shapes)
    python benchmarks/speed.py --steps=5 --batch_real=64

Configuration: 10 classes of 32x32x1 random images, IPC 10, factor 2, batch_real 256 per class,
4096 frequencies, calibration on, psi off and on. For each variant it prints

    psi=off image_steps=per_class: N.NN s/iter  ratio=R.RR  peak_rss=M MiB
    psi=off image_steps=summed: N.NN s/iter  ratio=R.RR  peak_rss=M MiB
    psi=off per_class / summed = P.PP

where s/iter is the median of --steps compiled `train_step` calls after warm-up, and ratio is
that time divided by the bare work of the same iteration, timed the same way in the same
process: the ConvNet forward on the real batch plus forward/backward on the decoded synthetic
batch. Per-class steps do the same network work and add 2K optimizer updates (K for matching,
K for calibration); `per_class / summed` is the cost of that, measured in one process. Each
variant runs in a fresh subprocess; peak_rss is that process's peak resident memory after the
step timings (before the bare work runs), i.e. TensorFlow itself, the model, and the step;
`before step` is the peak before the first step.
"""

import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from timing import median_seconds  # noqa: E402

flags.DEFINE_integer("steps", 7, "Timed steps per variant (after 2 warm-up steps).")
flags.DEFINE_integer("batch_real", 256, "Real images per class.")
flags.DEFINE_integer("num_freqs", 4096, "Frequencies per iteration.")
flags.DEFINE_integer("ipc", 10, "Images per class.")
flags.DEFINE_integer("factor", 2, "Multi-formation factor.")
flags.DEFINE_integer("class_group", 1, "Classes sent through the network at once.")
flags.DEFINE_enum("variant", None, ["off", "on"], "Run only this psi variant (in-process); "
                  "by default each variant runs in a fresh subprocess, so that memory one "
                  "leaves behind does not count against the other.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"], "XLA for both timings.")
flags.DEFINE_enum("frequency_draw", "class_views",
                  ["class_views", "per_class", "per_iteration"],
                  "train.py's --frequency_draw (psi off).")
FLAGS = flags.FLAGS


def peak_rss_mib():
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
    if FLAGS.variant is None:  # each variant in a fresh process: its own peak memory
        for variant in ("off", "on"):
            subprocess.run([sys.executable, os.path.abspath(__file__), f"--variant={variant}",
                            *sys.argv[1:]], check=True)
        return
    import keras
    import numpy as np
    import tensorflow as tf

    import ncfm_keras as nk

    k, shape = 10, (32, 32, 1)
    rng = np.random.default_rng(0)
    data = nk.Dataset("benchmark", rng.integers(0, 256, (k * 50, *shape), dtype=np.uint8),
                      np.repeat(np.arange(k), 50).astype(np.int32), np.zeros((k, *shape),
                      np.uint8), np.arange(k, dtype=np.int32), [str(c) for c in range(k)],
                      np.array([0.29], np.float32), np.array([0.35], np.float32))
    real = tf.constant(rng.integers(0, 256, (k, FLAGS.batch_real, *shape), dtype=np.uint8))
    jit = {"auto": bool(tf.config.list_physical_devices("GPU")), "true": True,
           "false": False}[FLAGS.jit_compile]
    net = nk.build_network("convnet", shape, k, data.mean, data.std)
    weights = [w.numpy() for w in net.weights]

    times = {}
    for image_steps in ("per_class", "summed"):
        config = nk.DistillConfig(ipc=FLAGS.ipc, factor=FLAGS.factor, init="noise",
                                  batch_real=FLAGS.batch_real, num_freqs=FLAGS.num_freqs,
                                  sampling_net=FLAGS.variant == "on", num_pretrained=1,
                                  pretrain_epochs=0, class_group=FLAGS.class_group,
                                  image_steps=image_steps, frequency_draw=FLAGS.frequency_draw)
        model = nk.NCFM(data, config, ([weights], [weights]))
        model.compile(keras.optimizers.AdamW(1e-3, weight_decay=5e-4),
                      keras.optimizers.SGD(1e-3, momentum=0.5), jit_compile=jit)
        before_step = peak_rss_mib()
        model.make_train_function()
        iterator = iter(tf.data.Dataset.from_tensors(real).repeat())
        times[image_steps] = median_seconds(
            lambda: float(model.train_function(iterator)["matching_loss"]), FLAGS.steps)
        peaks = (before_step, peak_rss_mib())

    extractor = nk.with_features(net)
    synthetic = tf.Variable(model.synthetic.numpy())  # the set's shape; values do not matter

    @tf.function(jit_compile=jit)
    def bare_work():
        real_features, _ = extractor(tf.reshape(nk.to_float(real), [-1, *shape]))
        with tf.GradientTape() as tape:
            features, _ = extractor(nk.decode(synthetic, FLAGS.factor))
            loss = tf.reduce_sum(tf.reduce_mean(features, 0) * tf.reduce_mean(real_features, 0))
        return tape.gradient(loss, synthetic)

    bare_time = median_seconds(lambda: bare_work().numpy(), FLAGS.steps)
    for image_steps, step_time in times.items():
        print(f"psi={FLAGS.variant} image_steps={image_steps}: {step_time:.2f} s/iter  "
              f"ratio={step_time / bare_time:.2f}  (bare work {bare_time:.2f} s)", flush=True)
    print(f"psi={FLAGS.variant} per_class / summed = {times['per_class'] / times['summed']:.3f}"
          f"  peak_rss={peaks[1]:.0f} MiB (before the first step {peaks[0]:.0f} MiB)",
          flush=True)


if __name__ == "__main__":
    app.run(main)
