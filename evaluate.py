"""Evaluates a distilled set (or a real-data baseline) by training fresh networks on it.

    python evaluate.py --distilled=runs/fmnist/distilled.npz --data_dir=/usr/share/datasets/fashion-mnist
    python evaluate.py --dataset=fashion_mnist --data_dir=/usr/share/datasets/fashion-mnist \\
        --baseline=random --ipc=10 --epochs=300 --repeats=3 --arch=convnet,alexnet
    python evaluate.py --dataset=fashion_mnist --data_dir=... --baseline=whole --epochs=3

    python evaluate.py --distilled=runs/fmnist/distilled.npz --data_dir=... --labels=teacher
    python evaluate.py --dataset=fashion_mnist --data_dir=... --baseline=random --ipc=10 \\
        --labels=teacher --teacher_of=runs/fmnist/distilled.npz

Prints one line per architecture, `arch: final X.XX ± Y.YY  best-seen X.XX ± Y.YY  (on the
test split)` (`arch [soft labels: MODE]: final ...` with --labels other than hard), and rewrites
`<output_dir>/evaluation.json` after every trained network, so a failure or Ctrl-C later keeps
what finished. "final" is the accuracy after the last epoch (the headline); "best-seen" is the
official statistic: the best test accuracy of the tests every 100 epochs (and after the last),
which selects on the test set and is shown for comparison with the paper.

--labels=teacher is the official soft-label recipe: the teacher is member 0 of the pool the
distilled set was distilled with (found in the pool cache train.py wrote: the folder recorded
in the set, or --pool_dir), its softmax on each decoded image is the target, and the last 101
epochs train on the hard labels. teacher_onehot gives images the teacher misclassifies their
one-hot label (the official code gives them softmax(one-hot)); teacher_per_batch takes the
teacher's softmax on every augmented batch. A --baseline takes its teacher from --teacher_of.
The teacher's own accuracy on the tested split is printed and recorded in evaluation.json
(`labels.teacher_accuracy`).
"""

import os
import sys
import time

from absl import app, flags

import cli  # first: it sets up TensorFlow's environment before TensorFlow loads
import ncfm_keras as nk
import tensorflow as tf

flags.DEFINE_string("dataset", None, "TFDS name, MNIST-family name with IDX files in "
                    "--data_dir, or folder:PATH (default: the distilled set's dataset).")
flags.DEFINE_string("data_dir", None, "TFDS data dir, or the folder holding MNIST IDX files.")
flags.DEFINE_integer("image_size", 32, "Side length folder images are resized to (with "
                     "--distilled, default: the set's).")
flags.DEFINE_string("distilled", None, "A distilled-set .npz written by train.py.")
flags.DEFINE_enum("baseline", "random", ["random", "herding", "whole"],
                  "Real-data baseline when --distilled is not given: --ipc images per class "
                  "drawn at random or selected by herding, or the whole training split (the "
                  "ceiling a distilled set is measured against; --ipc unused).")
flags.DEFINE_integer("ipc", 10, "Images per class of the baseline.")
flags.DEFINE_string("arch", "convnet", "Comma-separated architectures to evaluate.")
flags.DEFINE_enum("protocol", "ncfm", ["ncfm", "dm"], "Evaluation protocol.")
flags.DEFINE_integer("epochs", None, "Training epochs (default: the protocol's).")
flags.DEFINE_integer("repeats", 3, "Networks trained per architecture (mean ± std).")
flags.DEFINE_integer("validation", 0, "Test on this many training images held out at random "
                     "instead of the test split (for choosing settings; 0: the test split).")
flags.DEFINE_enum("labels", "hard", list(nk.LABEL_MODES), "Training labels: hard (the "
                  "class labels), teacher (the official soft labels), teacher_onehot (the same, "
                  "misclassified images on their one-hot label) or teacher_per_batch (the "
                  "teacher's softmax on every augmented batch).")
flags.DEFINE_string("teacher_of", None, "With soft --labels: the distilled-set .npz whose pool "
                    "provides the teacher (default: --distilled; needed for a --baseline).")
flags.DEFINE_string("pool_dir", None, "With soft --labels: the folder of cached pools "
                    "(train.py's --pool_dir), instead of the one recorded in the set.")
flags.DEFINE_integer("hard_label_epochs", nk.OFFICIAL_HARD_LABEL_EPOCHS, "With soft "
                     "--labels: train on the hard labels in this many last epochs (official: "
                     f"{nk.OFFICIAL_HARD_LABEL_EPOCHS}).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy of the trained networks: float32 (the official "
                  "evaluation's), mixed_bfloat16 (faster on CPUs with bfloat16 units) or "
                  "mixed_float16 (GPUs); see README 'On a CPU'.")
flags.DEFINE_integer("seed", 0, "Seed of the first repeat (repeat r uses seed + r).")
flags.DEFINE_string("output_dir", "results", "Where evaluation.json is written.")
FLAGS = flags.FLAGS


def find_teacher(data, distilled):
    """The soft-label teacher: from --teacher_of, else from the evaluated distilled set."""
    path = FLAGS.teacher_of or FLAGS.distilled
    cli.require(path, f"--labels={FLAGS.labels} with a --baseline needs "
                "--teacher_of=<a distilled.npz of this dataset>: member 0 of its pool teaches")
    owner = distilled if path == FLAGS.distilled else nk.load_distilled(path)
    same = (owner.data_digest == data.digest if owner.data_digest else  # any spelling of it
            owner.dataset == data.name and owner.class_names == data.class_names)
    cli.require(same,
                f"--teacher_of={path} was distilled from {owner.dataset}, not {data.name}; "
                "pass a distilled set of this dataset")
    return nk.distilled_teacher(owner, data, FLAGS.pool_dir, path), os.path.abspath(path)


def say_iterations(distilled):
    """Prints the iterations the set has been through, with a warning when they are fewer than
    its run asked for (a run stopped early)."""
    done, asked = distilled.iterations, distilled.config.get("iterations")
    if done is None:
        return  # an older file, or another tool's
    print(f"{FLAGS.distilled}: {done} distillation iterations", flush=True)
    if asked is not None and done < asked:
        print(f"warning: {FLAGS.distilled} holds {done} of the {asked} iterations its run asked "
              "for (it was stopped early); re-run its train.py command to finish it",
              file=sys.stderr, flush=True)


def main(unused_argv):
    archs, epochs = check_flags()
    policy = nk.set_precision(FLAGS.precision)
    cli.say_devices(policy, bool(tf.config.list_physical_devices("GPU")))  # Keras' "auto" XLA
    distilled, data, x, y, source = what_is_evaluated()
    nk.check_architectures(archs, data.image_shape)  # before anything is trained
    labels = {"mode": FLAGS.labels, "meaning": nk.LABEL_MODES[FLAGS.labels]}
    teacher = None
    if FLAGS.labels != "hard":
        teacher, labels["teacher_of"] = find_teacher(data, distilled)
        labels["hard_label_epochs"] = FLAGS.hard_label_epochs
    # Held out before anything draws from, selects in or trains on the training split; after
    # the teacher, which is found by the digest of the whole data.
    if FLAGS.validation:
        data = nk.validation_split(data, FLAGS.validation)
        smallest = int(data.class_counts().min())
        cli.require(FLAGS.distilled or FLAGS.baseline == "whole" or FLAGS.ipc <= smallest,
                    f"--ipc={FLAGS.ipc} with --validation={FLAGS.validation}: the smallest "
                    f"class keeps {smallest} training images; lower one of them")
    nk.check_writable(FLAGS.output_dir, "--output_dir")  # before any network trains
    if not FLAGS.distilled and FLAGS.baseline == "herding":
        x, y = nk.herding_subset(data, FLAGS.ipc, nk.pretrained_feature_fn(data, FLAGS.seed))
    if not FLAGS.distilled and FLAGS.baseline == "whole":
        x, y = nk.to_float(data.x_train).numpy(), data.y_train
        source["images"] = len(y)
    tested_on = "test split"
    if FLAGS.validation:
        tested_on = f"validation: {FLAGS.validation} training images"
    if teacher is not None:  # stated beside the students it teaches
        labels["teacher_accuracy"] = nk.test_accuracy(teacher, data)
        print(f"teacher (member 0 of the pool of {labels['teacher_of']}): "
              f"{labels['teacher_accuracy']:.2f} % on the {tested_on}", flush=True)
    results = {"dataset": data.name, "source": source, "protocol": FLAGS.protocol,
               "labels": labels, "tested_on": tested_on, "best_seen": BEST_SEEN,
               "repeats": FLAGS.repeats, "device": cli.device_name(), "precision": policy,
               "complete": False, "archs": {}}
    evaluate_all(archs, epochs, x, y, data, teacher, results)


def what_is_evaluated():
    """`(distilled, data, x, y, source)`: the --distilled set (None for a baseline), the data
    it is tested on, its decoded images and labels (None for a baseline: drawn per network,
    or selected later, as herding and whole are) and what evaluation.json says of it."""
    if not FLAGS.distilled:
        cli.require(FLAGS.dataset, "give --dataset (with --baseline) or --distilled")
        data = nk.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
        source = {"baseline": FLAGS.baseline}
        if FLAGS.baseline != "whole":
            nk.check_ipc(data, FLAGS.ipc)
            source["ipc"] = FLAGS.ipc
        return None, data, None, None, source
    distilled = nk.load_distilled(FLAGS.distilled)
    image_size = None
    if FLAGS["image_size"].present:
        image_size = FLAGS.image_size
    data = nk.data_of(distilled, FLAGS.distilled, FLAGS.dataset, FLAGS.data_dir, image_size)
    x, y = distilled.decoded()
    source = {"distilled": os.path.abspath(FLAGS.distilled), "ipc": distilled.ipc,
              "factor": distilled.factor, "iterations": distilled.iterations,
              "iterations_asked": distilled.config.get("iterations")}
    say_iterations(distilled)
    return distilled, data, x, y, source


BEST_SEEN = (f"the official statistic: the best of the tests every {nk.OFFICIAL_TEST_EVERY} "
             "epochs and after the last (selects on the test set; final is the headline)")


def check_flags():
    """The flag checks that need no data, and a warning for the flags the chosen mode never
    reads; returns the architectures and the epochs."""
    archs = cli.parse_archs(FLAGS.arch)
    cli.require(FLAGS.repeats >= 1, f"--repeats={FLAGS.repeats}: use 1 or more")
    cli.require(FLAGS.epochs is None or FLAGS.epochs >= 1,
                f"--epochs={FLAGS.epochs}: use 1 or more")
    cli.require(FLAGS.hard_label_epochs >= 0,
                f"--hard_label_epochs={FLAGS.hard_label_epochs}: use 0 or more")
    epochs = FLAGS.epochs or nk.PROTOCOLS[FLAGS.protocol].epochs
    cli.require(FLAGS.labels == "hard" or FLAGS.hard_label_epochs < epochs,
                f"--labels={FLAGS.labels} with --epochs={epochs} and --hard_label_epochs="
                f"{FLAGS.hard_label_epochs} would train on the hard labels throughout; pass "
                f"--hard_label_epochs below {epochs} (the official recipe keeps the last 5 % "
                "of its 2000 epochs hard)")
    unused = {}  # as train.py says
    if FLAGS.distilled:
        unused["--distilled"] = ("baseline", "ipc")
    elif FLAGS.baseline == "whole":
        unused["--baseline=whole"] = ("ipc",)
    if FLAGS.labels == "hard":
        unused["--labels=hard"] = ("teacher_of", "pool_dir", "hard_label_epochs")
    for why, names in unused.items():
        ignored = [f"--{name}" for name in names if FLAGS[name].present]
        if ignored:
            print(f"warning: {why} ignores {', '.join(ignored)}", file=sys.stderr)
    return archs, epochs


def evaluate_all(archs, epochs, x, y, data, teacher, results):
    """Trains --repeats fresh networks of `epochs` epochs of each architecture on `x`, `y` (a
    random baseline: redrawn per network), rewriting `evaluation.json` (with the peak memory so
    far) after every finished one, so that a failure or Ctrl-C later keeps what finished."""
    tag = "" if FLAGS.labels == "hard" else f" [soft labels: {FLAGS.labels}]"
    path = os.path.join(FLAGS.output_dir, "evaluation.json")
    finished = 0
    try:
        for arch in archs:
            networks = []
            noun = "network" if FLAGS.repeats == 1 else "networks"
            estimate = cli.Estimate(FLAGS.repeats * epochs, f"{arch} ({FLAGS.repeats} {noun})",
                                    later=f" (its tests, every {nk.OFFICIAL_TEST_EVERY} epochs, "
                                    "not included)")
            for r in range(FLAGS.repeats):
                seed = FLAGS.seed + r
                if not FLAGS.distilled and FLAGS.baseline == "random":
                    x, y = nk.random_subset(data, FLAGS.ipc, seed)
                start = time.time()
                network = nk.evaluate_images(x, y, data, arch, FLAGS.protocol, FLAGS.epochs,
                                             seed, nk.OFFICIAL_TEST_EVERY, labels=FLAGS.labels,
                                             teacher=teacher,
                                             hard_label_epochs=FLAGS.hard_label_epochs,
                                             callbacks=[estimate])
                network["seconds"] = round(time.time() - start, 1)
                networks.append(network)
                finished += 1
                results["archs"][arch] = {"summary": nk.summarize(networks), "runs": networks}
                results["peak_memory_mib"], results["peak_memory_of"] = cli.peak_memory()
                nk.write_json(path, results)  # every finished network, at once
                print(f"  {arch}{tag} repeat {r + 1}/{FLAGS.repeats}: final "
                      f"{network['final']:.2f}  best-seen {network['best_seen']:.2f}  "
                      f"({network['seconds']:.0f} s)", flush=True)
            final, best = (results["archs"][arch]["summary"][k] for k in ("final", "best_seen"))
            print(f"{arch}{tag}: final {final[0]:.2f} ± {final[1]:.2f}  best-seen "
                  f"{best[0]:.2f} ± {best[1]:.2f}  (on the {results['tested_on']})", flush=True)
    except KeyboardInterrupt:
        kept = "no network had finished, nothing written"
        if finished:
            kept = f"{path} keeps the {finished} finished network(s)"
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    results["complete"] = True
    nk.write_json(path, results)
    print(f"best-seen is the official statistic: the best of the tests every "
          f"{nk.OFFICIAL_TEST_EVERY} epochs and after the last; final is the headline\n"
          f"peak memory {results['peak_memory_mib']} MiB ({results['peak_memory_of']}) on "
          f"{results['device']}; wrote {path}")


if __name__ == "__main__":
    app.run(cli.guarded(main), flags_parser=cli.parse_flags)
