"""Distils a dataset with NCFM.

    python train.py --dataset=cifar10 --ipc=10
    python train.py --dataset=fashion_mnist --data_dir=/usr/share/datasets/fashion-mnist \\
        --ipc=10 --iterations=1000 --num_pretrained=4 --pretrain_epochs=1 --batch_real=64

Every setting defaults to the preset for the dataset (`ncfm_keras.PRESETS`, then
`ncfm_keras.DistillConfig`'s defaults); any flag given overrides it. Writes to --output_dir:
distilled.npz (the set, for evaluate.py), grid.png (one row per class), images/ (the decoded
images as an image folder), metrics.csv, loss_curves.png (drawn from it), tensorboard/,
checkpoint.npz (to resume) and, with --eval_every or --eval_epochs, evaluation.json.
"""

import dataclasses
import os
import sys
import time
import typing

from absl import app, flags

import cli  # first: it sets up TensorFlow's environment before TensorFlow loads
import keras
import ncfm_keras as nk
import runs
import tensorflow as tf

flags.DEFINE_string("dataset", "cifar10", "TFDS name, MNIST-family name with IDX files in "
                    "--data_dir, or folder:PATH.")
flags.DEFINE_string("data_dir", None, "TFDS data dir, or the folder holding MNIST IDX files.")
flags.DEFINE_integer("image_size", 32, "Side length folder images are resized to.")
flags.DEFINE_integer("ipc", 10, "Stored synthetic images per class.")
flags.DEFINE_string("output_dir", None, "Where outputs go (default runs/<dataset>_ipc<ipc>).")
flags.DEFINE_string("pool_dir", os.path.join(os.path.expanduser("~"), ".cache", "ncfm_keras",
                                             "pools"), "Cache of pretrained pools.")
for field in dataclasses.fields(nk.DistillConfig):  # every setting, its help from the config
    if field.name == "ipc":
        continue
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[type(field.default)]
    define(field.name, None, f"{field.metadata['help']} Default: the preset's, else "
           f"{field.default!r}.")
flags.DEFINE_integer("log_every", 10, "Iterations per Keras epoch: after each, its CSV rows, "
                     "one progress-bar line, distilled.npz and checkpoint.npz are written.")
flags.DEFINE_integer("eval_every", 0, "Evaluate the set every this many iterations (0: never "
                     "during training).")
flags.DEFINE_integer("eval_epochs", 0, "Epochs of each evaluation; >0 also evaluates at the "
                     "end (0 with --eval_every: the protocol's).")
flags.DEFINE_enum("eval_protocol", "ncfm", ["ncfm", "dm"], "Evaluation protocol.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                  "Dtype policy (auto: mixed_float16 on GPU, float32 on CPU).")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the training step (auto: on for GPU).")
flags.DEFINE_bool("deterministic", False, "Deterministic TF ops, oneDNN off: with the same "
                  "--seed, two runs on the same machine (and an interrupted-then-resumed one) "
                  "give identical outputs. Slower.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored"], "Devices: default (one) or "
                  "mirrored (tf.distribute.MirroredStrategy over all visible GPUs; each takes "
                  "an equal share of the classes, so their number must divide the classes).")
flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices (to try "
                     "--strategy=mirrored on a machine without GPUs).")
flags.DEFINE_bool("resume", True, "Continue from <output_dir>/checkpoint.npz when it exists "
                  "(--noresume starts over and replaces it).")
FLAGS = flags.FLAGS


def check_flags():
    """The flag checks that need no data; returns the `DistillConfig`."""
    cli.require(FLAGS.ipc >= 1, f"--ipc={FLAGS.ipc}: use 1 or more")
    cli.require(FLAGS.log_every >= 1, f"--log_every={FLAGS.log_every}: use 1 or more")
    cli.require(FLAGS.eval_every >= 0 and FLAGS.eval_epochs >= 0,
                "--eval_every and --eval_epochs must be >= 0")
    cli.require(FLAGS.cpu_devices >= 1, f"--cpu_devices={FLAGS.cpu_devices}: use 1 or more")
    cli.require(not (FLAGS.strategy == "mirrored" and FLAGS.jit_compile == "true"),
                "--jit_compile=true cannot be combined with --strategy=mirrored (Keras runs "
                "tf.distribute steps without XLA); drop one of them")
    config = nk.preset(FLAGS.dataset, FLAGS.ipc)
    given = {f.name: FLAGS[f.name].value for f in dataclasses.fields(config)
             if f.name != "ipc" and FLAGS[f.name].value is not None}
    config = dataclasses.replace(config, **given)  # validated as it is made
    if config.loss == "mmd":  # settings the chosen method never reads: said, not dropped
        unused, why = ("sampling_net", "sampler_", "frequency_draw", "num_freqs", "alpha",
                       "beta"), "--loss=mmd"
    elif config.sampling_net:
        unused, why = ("frequency_draw",), "--sampling_net=true (psi draws the frequencies)"
    else:
        unused, why = ("sampler_",), "--sampling_net=false (no psi)"
    ignored = [f"--{name}" for name in given if name.startswith(unused)]
    if ignored:
        print(f"warning: {why} ignores {', '.join(ignored)}", file=sys.stderr)
    cli.require(config.iterations % FLAGS.log_every == 0 or config.iterations < FLAGS.log_every,
                f"--iterations={config.iterations} must be a multiple of --log_every="
                f"{FLAGS.log_every}")
    cli.require(not FLAGS.deterministic or os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0",
                "--deterministic came from a flag file or from code, too late to turn oneDNN "
                "off before TensorFlow loaded: put it on the command line or set "
                "TF_ENABLE_ONEDNN_OPTS=0")
    return config


def main(unused_argv):
    config = check_flags()
    device = set_up_devices(config)
    data = load_data(config, device)
    steps = min(FLAGS.log_every, config.iterations)
    # What a resumed run must share with its checkpoint, checked before the pool trains.
    meta = runs.run_meta(data, config, steps, FLAGS.image_size, device.policy, device.jit,
                         device.count, FLAGS.deterministic)
    run = runs.Run(data, output_dir(), meta)
    nk.check_writable(run.output_dir, "--output_dir")  # before anything long
    nk.check_writable(FLAGS.pool_dir, "--pool_dir")
    restore = None
    if FLAGS.resume:
        restore = runs.resume_point(run.path("checkpoint.npz"), run.meta, config.iterations)
    print(f"distilling {data.name}: {data.num_classes} classes, images {data.image_shape}\n"
          f"{config}", flush=True)
    cli.say_devices(device.policy, device.jit, device.count)
    start = time.time()
    progress = 1 if sys.stdout.isatty() else 2  # in a log file: one line per epoch
    model = nk.build_distiller(data, config, FLAGS.pool_dir, device.jit, progress,
                               device.strategy, pool_callbacks=[pool_estimate(data, config)])
    print(f"pool ready ({time.time() - start:.0f} s)", flush=True)
    initial_epoch = runs.announce_resume(run, restore, steps)
    callbacks = runs.callbacks(run, restore, device.policy == "mixed_float16", FLAGS.eval_every,
                               FLAGS.eval_epochs, FLAGS.eval_protocol)
    callbacks.append(keras.callbacks.TensorBoard(run.path("tensorboard")))  # sees test_accuracy
    callbacks.append(distillation_estimate(config, steps, initial_epoch))
    start = time.time()
    real = nk.class_balanced_batches(data, config.batch_real, config.seed,
                                     start=initial_epoch * steps, order=config.real_batch)
    with runs.keeping(run, steps):  # a failing write says what is still intact
        model.fit(real, steps_per_epoch=steps, epochs=config.iterations // steps,
                  initial_epoch=initial_epoch, verbose=progress, callbacks=callbacks,
                  shuffle=False)
    if run.error is not None:
        raise run.error
    runs.report(run, model, initial_epoch, time.time() - start, FLAGS.eval_protocol,
                cli.device_name(), cli.peak_memory())


def load_data(config, device):
    """The dataset, checked for what the pool and the distillation need before either runs."""
    data = nk.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
    nk.check_architectures(["convnet"], data.image_shape)  # the pool's
    nk.check_distillable(data, config)
    nk.classes_per_replica(data.num_classes, device.count)
    return data


def pool_estimate(data, config):
    """The pool's `cli.Estimate`: the epochs of its members not yet in --pool_dir."""
    paths = nk.pool_members(data, config.num_pretrained, config.pretrain_epochs, FLAGS.pool_dir,
                            seed=config.seed)
    missing = sum(not os.path.exists(path) for path in paths)
    noun = "network" if missing == 1 else "networks"
    return cli.Estimate(missing * config.pretrain_epochs, f"the pool ({missing} {noun})",
                        later="; the distillation's estimate follows its first epoch")


def distillation_estimate(config, steps, initial_epoch):
    """The distillation's `cli.Estimate`: the Keras epochs (of `steps` iterations) to run."""
    later = ""
    if 0 < FLAGS.eval_every <= steps:  # the first epoch ends in one
        later = " (an evaluation every epoch included)"
    elif FLAGS.eval_every or FLAGS.eval_epochs:
        later = " (evaluations not included)"
    epochs = config.iterations // steps - initial_epoch
    return cli.Estimate(epochs, f"the distillation ({epochs * steps} iterations)", later)


class Devices(typing.NamedTuple):
    """How the run computes."""
    policy: str       # the Keras dtype policy
    strategy: object  # a tf.distribute strategy, or None for one device
    count: int        # devices
    jit: bool         # XLA


def set_up_devices(config):
    """Determinism, logical CPU devices and the dtype policy, before anything runs: `Devices`."""
    if FLAGS.deterministic:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
    if FLAGS.cpu_devices > 1:
        nk.split_cpu(FLAGS.cpu_devices)
    policy = nk.set_precision(FLAGS.precision)
    strategy = None
    count = 1
    if FLAGS.strategy == "mirrored":
        strategy = nk.mirrored_strategy()
        count = strategy.num_replicas_in_sync
    jit = nk.use_xla({"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile], strategy)
    return Devices(policy=policy, strategy=strategy, count=count, jit=jit)


def output_dir():
    """--output_dir, by default runs/<dataset>_ipc<ipc> (within the file-name limit)."""
    if FLAGS.output_dir:
        return FLAGS.output_dir
    name = nk.dataset_name(FLAGS.dataset)  # any spelling of a dataset resumes the same run
    return os.path.join("runs", runs.file_name(f"{name}_ipc{FLAGS.ipc}"))


if __name__ == "__main__":
    app.run(cli.guarded(main), flags_parser=cli.parse_flags)
