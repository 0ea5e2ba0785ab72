"""Where one NCFM iteration's time goes: each part of the step timed on its own.

    python benchmarks/step_profile.py                 # psi off and on, Fashion-MNIST shapes
    python benchmarks/step_profile.py --image_size=32 --steps=5

Configuration as benchmarks/speed.py (10 classes of random HxWx1 images, IPC 10, factor 2,
batch_real 256, 4096 frequencies, calibration on, one image step per class; no XLA on a CPU).
Each part below is a `tf.function` built from the model's own methods, doing what the compiled
`train_step` does for one iteration (all K classes), timed as the median of --steps calls
after two warm-up calls; the whole step is timed the same way, in the same process. The parts
are run apart, so their sum differs from the whole by what running them together costs or
saves (the loop, the control dependencies, caches): printed as "rest".

    draw            the iteration's randomness: pool member, blend, the DSA draws
    real features   DSA + ConvNet forward on K x batch_real real images
    frequencies     one t ~ N(0, I) [M, D] and each class's view of the real and synthetic
                    features (`NCFM._class_view`, the default), or with
                    --frequency_draw=per_class t drawn per class (K draws)
    syn fwd+bwd     per class: decode, DSA, ConvNet forward and backward to the pixels
    cf fwd+bwd      per class: the CF loss and its gradient wrt the synthetic features
    calibration     per class: decode, DSA, the trained member's cross-entropy, its gradient
    updates         2K AdamW updates of the pixels (K matching, K calibration)
    clamp+plateau   the clamp of the pixels and the learning-rate plateau
    psi ascent      (psi on) synthetic features of all classes, psi's forward/backward, update
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from timing import median_seconds  # noqa: E402

flags.DEFINE_integer("steps", 7, "Timed calls per part (after 2 warm-up calls).")
flags.DEFINE_integer("image_size", 28, "Side of the square images (Fashion-MNIST: 28).")
flags.DEFINE_integer("batch_real", 256, "Real images per class.")
flags.DEFINE_integer("num_freqs", 4096, "Frequencies per iteration.")
flags.DEFINE_enum("frequency_draw", "class_views", ["per_class", "class_views"],
                  "train.py's --frequency_draw (psi off).")
flags.DEFINE_enum("variant", None, ["off", "on"], "Profile only this psi variant "
                  "(in-process); by default each runs in a fresh subprocess.")
FLAGS = flags.FLAGS


def main(argv):
    if FLAGS.variant is None:
        for variant in ("off", "on"):
            subprocess.run([sys.executable, os.path.abspath(__file__), f"--variant={variant}",
                            *sys.argv[1:]], check=True)
        return
    import keras
    import numpy as np
    import tensorflow as tf

    import ncfm_keras as nk

    k, shape = 10, (FLAGS.image_size, FLAGS.image_size, 1)
    rng = np.random.default_rng(0)
    data = nk.Dataset("benchmark", rng.integers(0, 256, (k * 50, *shape), dtype=np.uint8),
                      np.repeat(np.arange(k), 50).astype(np.int32),
                      np.zeros((k, *shape), np.uint8), np.arange(k, dtype=np.int32),
                      [str(c) for c in range(k)], np.array([0.29], np.float32),
                      np.array([0.35], np.float32))
    real = tf.constant(rng.integers(0, 256, (k, FLAGS.batch_real, *shape), dtype=np.uint8))
    net = nk.build_network("convnet", shape, k, data.mean, data.std)
    weights = [w.numpy() for w in net.weights]
    config = nk.DistillConfig(ipc=10, factor=2, init="noise", batch_real=FLAGS.batch_real,
                              num_freqs=FLAGS.num_freqs, sampling_net=FLAGS.variant == "on",
                              num_pretrained=1, pretrain_epochs=0,
                              frequency_draw=FLAGS.frequency_draw)
    model = nk.NCFM(data, config, ([weights], [weights]))
    model.compile(keras.optimizers.AdamW(1e-3, weight_decay=5e-4),
                  keras.optimizers.SGD(1e-3, momentum=0.5), jit_compile=False)
    model.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensors(real).repeat())
    seed = tf.constant([1, 2])
    classes = tf.range(k)
    draw = model._draw(seed, classes)
    real_features = model._real_features(real, draw)
    stored = model._stored_synthetic(classes)  # [K, ipc, H, W, C]
    frequencies = model._class_frequencies(seed, classes)  # [K, M, D], one draw per class
    if model.sampler is not None:
        frequencies = tf.broadcast_to(model.sampler(seed), frequencies.shape)
    elif FLAGS.frequency_draw == "class_views":
        frequencies = tf.broadcast_to(model._plain_frequencies(seed), frequencies.shape)
    syn_features = model._synthetic_features(draw, classes)  # [K, S, D]
    grad = tf.zeros(model.synthetic.shape)

    def one_class(c, v):
        return tf.nest.map_structure(lambda x: x[c][None], v)

    @tf.function
    def draw_part():
        return tf.nest.flatten(model._draw(seed, classes))

    @tf.function
    def real_part():
        return model._real_features(real, draw)

    @tf.function
    def frequencies_part():
        if FLAGS.frequency_draw == "per_class":
            return [model._class_frequencies(seed, classes[c][None]) for c in range(k)]
        views = [model._class_view(features[c][None], seed, classes[c][None])
                 for features in (real_features, syn_features) for c in range(k)]
        return [model._plain_frequencies(seed), *views]

    def class_gradients(inputs, loss):
        """Per class c, the gradient of `loss(c, x)` with respect to x = inputs[c][None]."""
        grads = []
        for c in range(k):
            x = inputs[c][None]
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = loss(c, x)
            grads.append(tape.gradient(value, x))
        return grads

    def synthetic_loss(c, images):
        features = model._features(draw.blended, model._decoded(images), one_class(c, draw.dsa))
        return tf.reduce_sum(features)

    def cf(c, features):
        return nk.cf_loss(real_features[c][None], features, frequencies[c][None])

    def calibration(c, images):
        return model._calibration_loss(images, classes[c][None], draw.trained, seed)

    @tf.function
    def synthetic_part():
        return class_gradients(stored, synthetic_loss)

    @tf.function
    def cf_part():
        return class_gradients(syn_features, cf)

    @tf.function
    def calibration_part():
        return class_gradients(stored, calibration)

    @tf.function
    def updates_part():
        for _ in range(2 * k):
            model.optimizer.apply([grad], [model.synthetic])
        return tf.convert_to_tensor(model.synthetic)

    @tf.function
    def clamp_part():
        model.synthetic.assign(tf.clip_by_value(model.synthetic, 0.0, 1.0))
        model._plateau(tf.constant(1.0))
        return tf.convert_to_tensor(model.synthetic)

    @tf.function
    def psi_part():
        features = model._synthetic_features(draw, classes)
        variables = model.sampler.trainable_variables
        with tf.GradientTape() as tape:
            t = model.sampler(seed, training=True)
            ascent = -model._discrepancy(real_features, features, t)
        model.sampler_optimizer.apply(tape.gradient(ascent, variables), variables)
        return tf.stop_gradient(model.sampler(seed, training=True))

    parts = {"draw": draw_part, "real features": real_part}
    if model.sampler is None:
        parts["frequencies"] = frequencies_part
    else:
        parts["psi ascent"] = psi_part
    parts.update({"syn fwd+bwd": synthetic_part, "cf fwd+bwd": cf_part,
                  "calibration": calibration_part, "updates": updates_part,
                  "clamp+plateau": clamp_part})
    times = {name: median_seconds(lambda: tf.nest.map_structure(np.asarray, fn()), FLAGS.steps)
             for name, fn in parts.items()}
    whole = median_seconds(lambda: float(model.train_function(iterator)["matching_loss"]),
                           FLAGS.steps)
    print(f"psi={FLAGS.variant}, {FLAGS.image_size}x{FLAGS.image_size}x1, batch_real "
          f"{FLAGS.batch_real}, {FLAGS.num_freqs} frequencies: whole step {whole:.3f} s")
    for name, seconds in times.items():
        print(f"  {name:<14} {seconds:7.3f} s  {100 * seconds / whole:5.1f} %")
    rest = whole - sum(times.values())
    print(f"  {'rest':<14} {rest:7.3f} s  {100 * rest / whole:5.1f} %", flush=True)


if __name__ == "__main__":
    app.run(main)
