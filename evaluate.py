"""Evaluates a distilled set (or a real-data baseline) by training fresh networks on it.

    python evaluate.py --distilled=runs/fmnist/distilled.npz --data_dir=/usr/share/datasets/fashion-mnist
    python evaluate.py --dataset=fashion_mnist --data_dir=/usr/share/datasets/fashion-mnist \\
        --baseline=random --ipc=10 --epochs=300 --repeats=3 --arch=convnet,alexnet

Prints one line per architecture, `arch: final X.XX ± Y.YY  best-seen X.XX ± Y.YY`, and writes
every run to `<output_dir>/evaluation.json`. "final" is the accuracy after the last epoch (the
headline); "best-seen" is the best test accuracy seen during training, which selects on the
test set and is shown only for comparison with papers that report it.
"""

import os
import time

from absl import app, flags

import cli

flags.DEFINE_string("dataset", None, "TFDS name, MNIST-family name with IDX files in "
                    "--data_dir, or folder:PATH (default: the distilled set's dataset).")
flags.DEFINE_string("data_dir", None, "TFDS data dir, or the folder holding MNIST IDX files.")
flags.DEFINE_integer("image_size", 32, "Side length folder images are resized to (with "
                     "--distilled, default: the set's).")
flags.DEFINE_string("distilled", None, "A distilled-set .npz written by train.py.")
flags.DEFINE_enum("baseline", "random", ["random", "herding"],
                  "Real-data baseline when --distilled is not given.")
flags.DEFINE_integer("ipc", 10, "Images per class of the baseline.")
flags.DEFINE_string("arch", "convnet", "Comma-separated architectures to evaluate.")
flags.DEFINE_enum("protocol", "ncfm", ["ncfm", "dm"], "Evaluation protocol (spec section 7).")
flags.DEFINE_integer("epochs", None, "Training epochs (default: the protocol's).")
flags.DEFINE_integer("repeats", 3, "Networks trained per architecture (mean ± std).")
flags.DEFINE_integer("validation", 0, "Test on this many training images held out at random "
                     "instead of the test split (for choosing settings; 0: the test split).")
flags.DEFINE_integer("seed", 0, "Seed of the first repeat (repeat r uses seed + r).")
flags.DEFINE_string("output_dir", "results", "Where evaluation.json is written.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    nk = cli.nk

    archs = cli.parse_archs(FLAGS.arch)
    cli.require(FLAGS.repeats >= 1, f"--repeats={FLAGS.repeats}: use 1 or more")
    cli.require(FLAGS.epochs is None or FLAGS.epochs >= 1,
                f"--epochs={FLAGS.epochs}: use 1 or more")
    if FLAGS.distilled:
        distilled = nk.load_distilled(FLAGS.distilled)
        # Any spelling of the data it was distilled from, by default the place it came from;
        # its content digest decides. Files without one: the name must match, as it did.
        name = FLAGS.dataset or distilled.dataset
        data_dir = FLAGS.data_dir if FLAGS.dataset or FLAGS.data_dir else distilled.data_dir
        cli.require(distilled.data_digest or name == distilled.dataset, f"--dataset={name} "
                    f"but {FLAGS.distilled} was distilled from {distilled.dataset}; drop --dataset")
        cli.require(FLAGS.dataset or not name.startswith("folder:") or
                    os.path.isdir(name[len("folder:"):]), f"{FLAGS.distilled} was distilled from "
                    f"{name}, which does not exist (any more); pass --dataset=folder:PATH where "
                    "that data is now")
        image_size = (FLAGS.image_size if FLAGS["image_size"].present else
                      distilled.images.shape[1])
        data = nk.load_dataset(name, data_dir, image_size)
        where = data.name + (f" in {data.data_dir}" if data.data_dir else "")
        cli.require(data.class_names == distilled.class_names and
                    data.image_shape == distilled.images.shape[1:],
                    f"{FLAGS.distilled} does not match {where} (classes or image shape differ); "
                    "pass the data it was distilled from (--dataset, --data_dir)")
        cli.require(distilled.data_digest in (None, data.digest),
                    f"{where} is not the data {FLAGS.distilled} was distilled from "
                    f"({distilled.dataset}" + (f" in {distilled.data_dir}" if distilled.data_dir
                                               else "") + "): the same classes and image size "
                    "but other images; pass that data (--dataset, --data_dir)")
        x, y = distilled.decoded()
        source = {"distilled": os.path.abspath(FLAGS.distilled), "ipc": distilled.ipc,
                  "factor": distilled.factor}
    else:
        cli.require(FLAGS.dataset, "give --dataset (with --baseline) or --distilled")
        data = nk.load_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
        nk.check_ipc(data, FLAGS.ipc)
        source = {"baseline": FLAGS.baseline, "ipc": FLAGS.ipc}
        if FLAGS.baseline == "herding":
            x, y = nk.herding_subset(data, FLAGS.ipc, nk.pretrained_feature_fn(data, FLAGS.seed))
    if FLAGS.validation:
        data = nk.validation_split(data, FLAGS.validation)
    tested_on = (f"validation: {FLAGS.validation} training images" if FLAGS.validation else
                 "test split")
    results = {"dataset": data.name, "source": source, "protocol": FLAGS.protocol,
               "tested_on": tested_on, "archs": {}}
    for arch in archs:
        runs = []
        for r in range(FLAGS.repeats):
            seed = FLAGS.seed + r
            if not FLAGS.distilled and FLAGS.baseline == "random":
                x, y = nk.random_subset(data, FLAGS.ipc, seed)
            start = time.time()
            run = nk.evaluate_images(x, y, data, arch, FLAGS.protocol, FLAGS.epochs, seed)
            run["seconds"] = round(time.time() - start, 1)
            runs.append(run)
            print(f"  {arch} repeat {r + 1}/{FLAGS.repeats}: final {run['final']:.2f}  "
                  f"best-seen {run['best_seen']:.2f}  ({run['seconds']:.0f} s)", flush=True)
        summary = nk.summarize(runs)
        results["archs"][arch] = {"summary": summary, "runs": runs}
        print(f"{arch}: final {summary['final'][0]:.2f} ± {summary['final'][1]:.2f}  "
              f"best-seen {summary['best_seen'][0]:.2f} ± {summary['best_seen'][1]:.2f}  "
              f"(on the {tested_on})", flush=True)
    path = os.path.join(FLAGS.output_dir, "evaluation.json")
    nk.write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(cli.guarded(main), flags_parser=cli.parse_flags)
