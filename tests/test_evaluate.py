import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import ncfm_keras as nk
import runs
from conftest import FASHION_MNIST_DIR, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluation_learns_from_a_small_real_subset(small_fashion_mnist):
    x, y = nk.random_subset(small_fashion_mnist, ipc=10, seed=0)
    result = nk.evaluate_images(x, y, small_fashion_mnist, "convnet", "dm", epochs=30,
                                test_every=10)
    assert [e for e, _ in result["history"]] == [10, 20, 30]
    assert result["final"] == result["history"][-1][1]
    assert result["best_seen"] == max(a for _, a in result["history"]) >= result["final"]
    assert 45 < result["final"] <= 100  # chance is 10 %


def test_evaluation_learns_in_mixed_bfloat16(small_fashion_mnist):
    """evaluate.py --precision=mixed_bfloat16: bfloat16 compute, float32 weights and logits."""
    x, y = nk.random_subset(small_fashion_mnist, ipc=10, seed=0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        result = nk.evaluate_images(x, y, small_fashion_mnist, "convnet", "ncfm", epochs=30)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert 45 < result["final"] <= 100  # chance is 10 %


def test_soft_labels_and_ncfm_protocol(small_fashion_mnist):
    x, y = nk.random_subset(small_fashion_mnist, ipc=2, seed=1)
    soft = np.full((len(y), 10), 0.02, np.float32)
    soft[np.arange(len(y)), y] = 0.82
    result = nk.evaluate_images(x, soft, small_fashion_mnist, "convnet", "ncfm", epochs=2)
    assert 0 <= result["final"] <= 100 and result["epochs"] == 2


def test_training_augments_in_normalised_space_by_default():
    assert {p.dsa_space for p in nk.PROTOCOLS.values()} == {"normalized"}
    x = np.full((8, 16, 16, 1), 255, np.uint8)
    y = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    protocol = dataclasses.replace(nk.PROTOCOLS["dm"], augment="cutout", batch_size=8)
    model = nk.build_network("convnet", (16, 16, 1), 2, [0.3], [0.2])
    for space, fill in (("normalized", 0.3), ("pixel", 0.0)):
        trainer = nk.NetworkTrainer(model, dataclasses.replace(protocol, dsa_space=space), 0,
                                    mean=np.array([0.3]), std=np.array([0.2]))
        images, _ = trainer.augmented(nk.to_float(x), y, tf.constant([0, 1], tf.int64))
        np.testing.assert_allclose(np.unique(images.numpy().round(5)), [fill, 1.0])  # holes
    with pytest.raises(nk.NCFMError, match="dsa_space='rgb' is unknown"):
        dataclasses.replace(protocol, dsa_space="rgb")
    with pytest.raises(nk.NCFMError, match="needs the dataset's mean and std"):
        nk.train_network(model, x, y, 2, protocol)


def _dataset_ops(dataset):
    """Every op of `dataset`'s graph, its functions' included."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(
        tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor).numpy())
    ops = {node.op for node in graph.node}
    return ops | {node.op for f in graph.library.function for node in f.node_def}


def test_networks_train_with_the_augmentation_in_the_step(small_fashion_mnist):
    d = small_fashion_mnist
    x, y = d.x_train[:40], d.y_train[:40]  # uint8, as stored
    targets = np.eye(d.num_classes, dtype=np.float32)[y]
    # The host pipeline only orders and batches the stored images: no random op, and its
    # batches are the stored images in the order of numpy's permutations, whatever TF's seed.
    batches = nk.training_batches(x, targets, 16, seed=0, epochs=2)
    ops = _dataset_ops(batches)
    assert {"BatchDatasetV2", "RepeatDataset", "GatherV2"} <= ops
    assert not [op for op in ops if "Random" in op or "Stateless" in op or "Shuffle" in op], ops
    rng = np.random.default_rng(0)
    orders = [rng.permutation(40) for _ in range(2)]
    expected = [order[i:i + 16] for order in orders for i in (0, 16, 32)]  # 16, 16, 8 a epoch
    keras.utils.set_random_seed(99)  # the global seed plays no part
    got = list(batches.take(7))
    for (images, labels), indices in zip(got, expected + expected[:1]):  # then again
        assert images.dtype == tf.uint8
        np.testing.assert_array_equal(images.numpy(), x[indices])
        np.testing.assert_array_equal(labels.numpy(), targets[indices])
    # DSA and CutMix run in the training step, from the step's stateless seed:
    protocol = dataclasses.replace(nk.PROTOCOLS["ncfm"], epochs=2, batch_size=16)

    def trained(seed, network_seed=0):
        model = nk.build_network("convnet", d.image_shape, d.num_classes, d.mean, d.std,
                                 seed=network_seed)
        nk.train_network(model, x, y, d.num_classes, protocol, seed=seed, mean=d.mean,
                         std=d.std)
        return model.get_weights()

    first, again, other_draws = trained(0), trained(0), trained(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # a function of the seed
    assert not np.allclose(first[0], other_draws[0])  # same start, other augmentation draws
    trainer = nk.NetworkTrainer(keras.Sequential([keras.layers.Flatten()]), protocol, 7,
                                mean=d.mean, std=d.std)
    images = nk.to_float(x[:16])
    draws = [trainer.augmented(images, targets[:16], tf.random.experimental.stateless_fold_in(
        tf.constant([7, 0], tf.int64), step, alg=nk.RNG))[0] for step in (0, 1)]
    assert not np.allclose(draws[0], images)  # augmented
    assert not np.allclose(draws[0], draws[1])  # a fresh draw every step


def test_the_augmentation_compiles_with_xla():
    # What a GPU runs (Keras' jit_compile="auto"): DSA and CutMix must have XLA kernels.
    protocol = nk.PROTOCOLS["ncfm"]
    trainer = nk.NetworkTrainer(keras.Sequential([keras.layers.Flatten()]), protocol, 0,
                                mean=np.array([0.3]), std=np.array([0.2]))
    step = tf.function(trainer.augmented, jit_compile=True)
    images = tf.random.uniform([8, 28, 28, 1])
    mixed, labels = step(images, tf.eye(8), tf.constant([3, 4], tf.int64))
    assert mixed.shape == images.shape and np.allclose(labels.numpy().sum(1), 1.0)


def test_decode_multiformation():
    images = np.zeros((1, 4, 4, 1), np.float32)
    images[0, :2, 2:] = 1.0  # top-right cell
    decoded = nk.decode(tf.constant(images), 2).numpy()
    assert decoded.shape == (4, 4, 4, 1)
    np.testing.assert_allclose(decoded[:, 0, 0, 0], [0, 1, 0, 0])  # cells in row-major order
    np.testing.assert_allclose(decoded[1], 1.0)
    assert list(nk.decode_labels([3, 5], 2)) == [3, 3, 3, 3, 5, 5, 5, 5]


def _distilled(**changes):
    fields = dict(images=np.random.default_rng(0).random((6, 8, 8, 1), np.float32),
                  labels=np.repeat(np.arange(3), 2).astype(np.int32), ipc=2, factor=2,
                  dataset="toy", class_names=["a", "b", "c"], mean=np.array([0.5], np.float32),
                  std=np.array([0.2], np.float32), config={"iterations": 3})
    fields.update(changes)
    return nk.DistilledSet(**fields)


def test_distilled_file_round_trip(tmp_path):
    path = str(tmp_path / "set.npz")
    nk.save_distilled(path, _distilled())
    loaded = nk.load_distilled(path)
    np.testing.assert_array_equal(loaded.images, _distilled().images)
    assert loaded.class_names == ["a", "b", "c"] and loaded.config == {"iterations": 3}
    x, y = loaded.decoded()
    assert x.shape == (24, 8, 8, 1) and list(np.bincount(y)) == [8, 8, 8]
    assert os.listdir(tmp_path) == ["set.npz"]  # no temporary files left behind


def test_invalid_sets_are_not_written(tmp_path):
    path = str(tmp_path / "set.npz")
    bad = _distilled(images=np.full((6, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(nk.NCFMError, match="not finite values in"):
        nk.save_distilled(path, bad)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content,message", [
    (b"not a zip file at all", "not a readable distilled-set file"),
    (None, "not a readable distilled-set file"),  # truncated
    ("foreign", "not a readable distilled-set file"),
    ("shape", "invalid distilled set"),
])
def test_malformed_files_are_rejected(tmp_path, content, message):
    path = str(tmp_path / "set.npz")
    if content is None:
        nk.save_distilled(path, _distilled())
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif content == "foreign":
        np.savez(path, weights=np.zeros(3))
    elif content == "shape":
        np.savez(path, format=nk.FILE_FORMAT, images=np.zeros((5, 8, 8, 1), np.float32),
                 labels=np.zeros(5, np.int32), ipc=2, factor=2, dataset="toy",
                 class_names=np.array(["a", "b", "c"]), mean=np.zeros(1), std=np.ones(1),
                 config="{}")
    else:
        open(path, "wb").write(content)
    with pytest.raises(nk.NCFMError, match=message):
        nk.load_distilled(path)


def test_loss_curves_are_drawn_from_the_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    rows = ["iteration,matching_loss,sampler_loss,calibration_loss,image_grad_norm,"
            "learning_rate,test_accuracy"]
    rows += [f"{i},{30 - i},{31 - i},{2 / i},{0.5},{0.001},{'' if i < 40 else 70}"
             for i in range(1, 41)]
    csv.write_text("\n".join(rows) + "\n")
    runs.plot_metrics(csv, tmp_path / "curves.png")
    from PIL import Image
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    assert image.shape[1] > 3 * image.shape[0]  # four panels side by side
    assert image.std() > 5  # not blank


def test_csv_rows_hold_each_iterations_values_after_a_skipped_step(tmp_path):
    """Under mixed float16 loss scaling skips overflowing steps: NCFM's last-step norm of such
    a step is NaN. Its row must stay empty and every row hold its own iteration's values."""
    last_step = {name: keras.Variable(0.0) for name in ("matching_loss", "image_grad_norm")}
    model = types.SimpleNamespace(last_step=last_step, stop_training=False,
                                  optimizer=types.SimpleNamespace(learning_rate=1e-3))
    writer = runs.MetricsCsv(runs.Run(None, str(tmp_path), {}))
    writer.set_model(model)
    writer.set_params({"steps": 3, "epochs": 1})
    writer.on_epoch_begin(0)
    for batch, (loss, norm) in enumerate([(30.0, 2.0), (20.0, None), (10.0, 5.0)]):
        last_step["matching_loss"].assign(loss)
        last_step["image_grad_norm"].assign(math.nan if norm is None else norm)
        writer.on_train_batch_end(batch, {})
    assert [row["matching_loss"] for row in writer.rows] == [30.0, 20.0, 10.0]
    assert [row.get("image_grad_norm") for row in writer.rows] == [2.0, None, 5.0]
    assert "calibration_loss" not in writer.rows[0]  # a value the step does not compute


def test_pool_key_changes_with_the_pretraining_recipe(monkeypatch):
    data = nk.Dataset("toy", np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 0, 1, 1]),
                      np.zeros((2, 8, 8, 1), np.uint8), np.array([0, 1]), ["a", "b"],
                      np.array([0.3]), np.array([0.2]))
    key = nk.pool_key(data, "convnet", 60, 0)
    assert key.startswith("toy-") and "-convnet-e60-s0-r" in key
    assert nk.pool_key(data, "convnet", 60, 0) == key  # stable
    monkeypatch.setitem(nk.PROTOCOLS, "pretrain",
                        dataclasses.replace(nk.PROTOCOLS["pretrain"], dsa_space="pixel"))
    pixel_key = nk.pool_key(data, "convnet", 60, 0)
    monkeypatch.undo()
    monkeypatch.setattr(nk, "POOL_RECIPE", nk.POOL_RECIPE + 1)
    assert len({key, pixel_key, nk.pool_key(data, "convnet", 60, 0)}) == 3


# ------------------------------------------------------------------------------------------
# Soft labels (the official recipe and per-batch labels), the arch check, partial results
# ------------------------------------------------------------------------------------------

def _linear(kernel, bias, image_shape=(1, 1, 1)):
    """A network whose logits are `flatten(image) @ kernel + bias`."""
    inputs = keras.Input(image_shape)
    dense = keras.layers.Dense(len(bias))
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return model


def test_official_soft_targets_by_hand():
    # Image 0 (pixel 0) gets logits [2, 1, 0]; image 1 (pixel 1) gets [0, 3, 1].
    teacher = _linear([[-2.0, 2.0, 1.0]], [2.0, 1.0, 0.0])
    x = np.array([0.0, 1.0], np.float32).reshape(2, 1, 1, 1)
    y = np.array([0, 0])  # image 0 classified correctly, image 1 misclassified (as class 1)
    e = math.e
    official = nk.teacher_targets(teacher, x, y)
    np.testing.assert_allclose(official[0], np.array([e ** 2, e, 1]) / (e ** 2 + e + 1),
                               rtol=1e-5)
    # The logits of a misclassified image become one-hot before the softmax:
    np.testing.assert_allclose(official[1], np.array([e, 1, 1]) / (e + 2), rtol=1e-5)
    fixed = nk.teacher_targets(teacher, x, y, misclassified="onehot")
    np.testing.assert_allclose(fixed[0], official[0], rtol=1e-6)
    np.testing.assert_array_equal(fixed[1], [1, 0, 0])


# A frozen student: lr 0, logits [5, 0, 0] whatever the image, so an epoch's mean loss is
# -sum_k target_k log p_k with p fixed, and shows which targets were trained on.
FROZEN = nk.EvalProtocol("frozen", 3, 4, "sgd", 0.0, 0.0, (0.5,), 1.0, "color", 0.0,
                        dsa_space="pixel")


def _epoch_losses(protocol, seed=0, **kwargs):
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    x = np.random.default_rng(0).random((8, 2, 2, 1), np.float32)
    student = _linear(np.zeros((4, 3)), [5.0, 0.0, 0.0], (2, 2, 1))
    nk.train_network(student, x, np.ones(8, int), 3, protocol, seed, [record], **kwargs)
    return np.array(losses)


def test_hard_labels_train_the_last_epochs():
    soft = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (8, 1))  # the student's favourite
    losses = _epoch_losses(FROZEN, soft=soft, hard_label_epochs=1)
    log_p = np.log(np.exp([5.0, 0, 0]) / np.exp([5.0, 0, 0]).sum())
    np.testing.assert_allclose(losses, [-log_p[0], -log_p[0], -log_p[1]], rtol=1e-4)
    # The official switch (soft while 1-based epoch < epochs - 100) trains on hard labels in
    # the last OFFICIAL_HARD_LABEL_EPOCHS epochs:
    epochs = 2000
    assert (sum(epoch < epochs - 100 for epoch in range(1, epochs + 1)) ==
            epochs - nk.OFFICIAL_HARD_LABEL_EPOCHS)


def test_per_batch_labels_follow_the_augmentation():
    # The teacher's class-0 logit is 4 x the mean pixel: colour augmentation changes it.
    teacher = _linear(np.tile([[1.0, 0.0, 0.0]], (4, 1)), [0.0, 0.0, 0.0], (2, 2, 1))
    x = np.random.default_rng(0).random((8, 2, 2, 1), np.float32)
    on_x = tf.nn.softmax(teacher(x)).numpy()  # the teacher's targets on the plain images

    def losses(ops, **kwargs):
        protocol = dataclasses.replace(FROZEN, augment=ops, epochs=2)
        return _epoch_losses(protocol, hard_label_epochs=0, **kwargs)

    # Without augmentation, per-batch labels are the teacher's targets on the plain images;
    assert np.allclose(losses("", teacher=teacher), losses("", soft=on_x), rtol=1e-5)
    # with it, they are the teacher's targets on what the student sees, which differ.
    per_batch, fixed = losses("color", teacher=teacher), losses("color", soft=on_x)
    assert np.all(np.abs(per_batch - fixed) > 1e-3), (per_batch, fixed)


def test_smallest_image_sizes():
    assert {arch: nk.smallest_image_size(arch, 1) for arch in nk.ARCHITECTURES} == {
        "convnet": 2, "alexnet": 8, "vgg11": 32, "resnet18": 1}
    nk.check_architectures(nk.ARCHITECTURES, (32, 32, 3))
    with pytest.raises(nk.NCFMError, match="vgg11 needs at least 32x32, alexnet needs at "
                                           "least 8x8"):
        nk.check_architectures(["convnet", "vgg11", "alexnet"], (4, 4, 1))


# ------------------------------------------------------------------------------------------
# evaluate.py with soft labels, too-small images and partial results (subprocesses)
# ------------------------------------------------------------------------------------------

def _run(*args, script="evaluate.py"):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-class, 16x16 folder dataset and a distilled set of it (its pool cached)."""
    root = tmp_path_factory.mktemp("tiny")
    write_image_folder(str(root / "imgs"), ["dark", "mid", "light"], per_class=8,
                       size=(16, 16))
    dataset = f"--dataset=folder:{root / 'imgs'}"
    result = _run(dataset, "--image_size=16", "--ipc=1", "--factor=1", "--init=real",
                  "--iterations=2", "--log_every=2", "--batch_real=4", "--num_freqs=64",
                  "--num_pretrained=1", "--pretrain_epochs=1", f"--pool_dir={root / 'pools'}",
                  f"--output_dir={root / 'run'}", script="train.py")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, dataset


def test_soft_label_evaluation_end_to_end(tiny_run):
    root, dataset = tiny_run
    distilled = root / "run" / "distilled.npz"
    record = nk.load_distilled(str(distilled)).pool
    assert record["dir"] == str(root / "pools") and record["arch"] == "convnet"
    assert os.path.isfile(root / "pools" / record["key"] / "member-000.npz")
    common = ["--image_size=16", "--epochs=2", "--repeats=1", "--protocol=dm",
              "--hard_label_epochs=1"]
    # The official 101 hard-label epochs would leave no soft epoch of 2: refused, not ignored.
    _one_line_error(_run(f"--distilled={distilled}", *common[:-1], "--labels=teacher"),
                    "would train on the hard labels throughout", "--hard_label_epochs below 2")

    result = _run(f"--distilled={distilled}", *common, "--labels=teacher",
                  f"--output_dir={root / 'soft'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convnet [soft labels: teacher]: final " in result.stdout
    report = json.loads((root / "soft" / "evaluation.json").read_text())
    assert report["labels"]["mode"] == "teacher" and report["complete"]
    assert report["labels"]["teacher_of"] == str(distilled)
    assert report["archs"]["convnet"]["runs"][0]["labels"] == "teacher"
    # The teacher's own test accuracy, as its logits on the test split give it:
    data = nk.load_dataset(f"folder:{root / 'imgs'}", image_size=16)
    teacher = nk.distilled_teacher(nk.load_distilled(str(distilled)), data)
    predicted = np.argmax(teacher(nk.to_float(data.x_test)), axis=1)
    accuracy = report["labels"]["teacher_accuracy"]
    assert accuracy == pytest.approx(100 * np.mean(predicted == data.y_test))
    assert f"{accuracy:.2f} % on the test split" in result.stdout

    # A random real subset under the same teacher, with per-batch labels:
    result = _run(dataset, "--baseline=random", "--ipc=2", *common,
                  "--labels=teacher_per_batch", f"--teacher_of={distilled}",
                  f"--output_dir={root / 'random'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convnet [soft labels: teacher_per_batch]: final " in result.stdout
    report = json.loads((root / "random" / "evaluation.json").read_text())
    assert report["labels"]["teacher_accuracy"] == accuracy  # the same teacher
    _one_line_error(_run(dataset, "--baseline=random", "--ipc=2", *common, "--labels=teacher"),
                    "--teacher_of")

    # The pool moved: one line naming the file expected and the fixes; --pool_dir finds it.
    os.rename(root / "pools", root / "moved")
    result = _run(f"--distilled={distilled}", *common, "--labels=teacher",
                  f"--output_dir={root / 'missing'}")
    _one_line_error(result, str(root / "pools" / record["key"] / "member-000.npz"),
                    "re-run train.py", "--pool_dir")
    assert not os.path.exists(root / "missing")
    result = _run(f"--distilled={distilled}", *common, "--labels=teacher_onehot",
                  f"--pool_dir={root / 'moved'}", f"--output_dir={root / 'moved_eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convnet [soft labels: teacher_onehot]: final " in result.stdout


def test_too_small_images_fail_before_any_training(tmp_path):
    write_image_folder(str(tmp_path / "imgs"), ["a", "b"], per_class=4, size=(16, 16))
    result = _run(f"--dataset=folder:{tmp_path / 'imgs'}", "--image_size=16", "--ipc=2",
                  "--arch=convnet,alexnet,resnet18,vgg11", "--epochs=1", "--repeats=1",
                  f"--output_dir={tmp_path / 'out'}")
    _one_line_error(result, "images of 16x16 are too small: vgg11 needs at least 32x32")
    assert "repeat" not in result.stdout and not os.path.exists(tmp_path / "out")
    # The same fault in train.py: the pool's ConvNet on 1x1 images.
    result = _run(f"--dataset=folder:{tmp_path / 'imgs'}", "--image_size=1", "--ipc=1",
                  f"--output_dir={tmp_path / 'run'}", f"--pool_dir={tmp_path / 'pools'}",
                  script="train.py")
    _one_line_error(result, "convnet needs at least 2x2")
    assert not os.path.exists(tmp_path / "pools")


def test_a_set_that_does_not_fit_its_data_says_how(tmp_path, fashion_mnist):
    """A channels-first set from another tool ([10, 1, 28, 28]) was told that classes or image
    shape differ and to pass the data it was distilled from. The layout is named with both
    shapes, and classes and shapes that differ each say how."""
    d = fashion_mnist
    labels = np.arange(10, dtype=np.int32)
    channels_first = tmp_path / "nchw.npz"
    for factor in (1, 2):  # 1 % 2 made it 'factor 2 does not divide the image size'
        np.savez(channels_first, format=nk.FILE_FORMAT, labels=labels, ipc=1, factor=factor,
                 images=np.full((10, 1, 28, 28), 0.5, np.float32), dataset=d.name,
                 class_names=np.array(d.class_names), mean=d.mean, std=d.std, config="{}")
        with pytest.raises(nk.NCFMError) as error:
            nk.load_distilled(str(channels_first))
        message = str(error.value)
        for fragment in ("[10, 1, 28, 28]: channels first (NCHW)", "channels last (NHWC)",
                         "transpose it to [N, H, W, C] ([10, 28, 28, 1]"):
            assert fragment in message, message
    _one_line_error(_run(f"--distilled={channels_first}", f"--output_dir={tmp_path / 'out'}"),
                    "channels first (NCHW)", "transpose it to [N, H, W, C]")
    renamed = tmp_path / "renamed.npz"
    nk.save_distilled(str(renamed), nk.DistilledSet(
        np.full((10, 28, 28, 1), 0.5, np.float32), labels, 1, 1, d.name,
        [name.lower() for name in d.class_names], d.mean, d.std, {}))
    _one_line_error(_run(f"--distilled={renamed}", f"--data_dir={FASHION_MNIST_DIR}",
                         f"--output_dir={tmp_path / 'out'}"),
                    "holds other classes than fashion_mnist",
                    "class 0 is 't-shirt/top' there, 'T-shirt/top' here")
    rgb = tmp_path / "rgb.npz"
    nk.save_distilled(str(rgb), nk.DistilledSet(
        np.full((10, 28, 28, 3), 0.5, np.float32), labels, 1, 1, d.name, d.class_names,
        d.mean, d.std, {}))
    _one_line_error(_run(f"--distilled={rgb}", f"--data_dir={FASHION_MNIST_DIR}",
                         f"--output_dir={tmp_path / 'out'}"),
                    "holds images of shape [28, 28, 3] [H, W, C], fashion_mnist in "
                    f"{FASHION_MNIST_DIR} has [28, 28, 1]")
    assert not os.path.exists(tmp_path / "out")


# Runs evaluate.py with the second network failing (the exception given).
INJECTED = """
import sys
sys.path.insert(0, {root!r})
import cli, evaluate
from absl import app
real, calls = cli.nk.evaluate_images, []
def second_fails(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise {exception}
    return real(*args, **kwargs)
cli.nk.evaluate_images = second_fails
app.run(cli.guarded(evaluate.main), flags_parser=cli.parse_flags)
"""


@pytest.mark.parametrize("exception", ["RuntimeError('injected')", "KeyboardInterrupt"])
def test_finished_networks_survive_a_later_failure(tmp_path, exception):
    write_image_folder(str(tmp_path / "imgs"), ["a", "b"], per_class=4, size=(16, 16))
    script = INJECTED.format(root=ROOT, exception=exception)
    result = subprocess.run(
        [sys.executable, "-c", script, f"--dataset=folder:{tmp_path / 'imgs'}",
         "--image_size=16", "--ipc=2", "--arch=convnet,alexnet", "--epochs=1", "--repeats=1",
         "--protocol=dm", f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert list(report["archs"]) == ["convnet"] and not report["complete"]
    assert len(report["archs"]["convnet"]["runs"]) == 1
    if exception == "KeyboardInterrupt":
        assert result.returncode == 130
        assert result.stderr.strip().splitlines() == [
            f"interrupted: {tmp_path / 'out' / 'evaluation.json'} keeps the 1 finished "
            "network(s)"]


# Runs evaluate.py with networks not trained but checked: no image a network would train on
# is in the split it is tested on; the herding ConvNet's training split is printed.
NO_TRAINING = """
import sys
sys.path.insert(0, {root!r})
import cli, evaluate
import numpy as np
from absl import app
nk, real_features = cli.nk, cli.nk.pretrained_feature_fn

def checked(x, y, data, *args, **kwargs):
    trained = {{row.tobytes() for row in np.round(x * 255).astype(np.uint8)}}
    tested = {{row.tobytes() for row in data.x_test}}
    print(f"shared {{len(trained & tested)}} of {{len(trained)}}")
    return {{"final": 0.0, "best_seen": 0.0}}

def features(data, *args, **kwargs):
    print(f"herding features trained on {{len(data.x_train)}} images")
    return real_features(data, *args, epochs=1)

nk.evaluate_images, nk.pretrained_feature_fn = checked, features
app.run(cli.guarded(evaluate.main), flags_parser=cli.parse_flags)
"""


@pytest.mark.parametrize("baseline, trained", [("random", 9), ("herding", 9), ("whole", 12)])
def test_validation_images_are_held_out_of_what_the_baselines_train_on(tmp_path, baseline,
                                                                       trained):
    """--validation=N tested on training images that the baselines were drawn from (random),
    selected from (herding) and its ConvNet trained on, or that are all of them (whole: the
    24 training images but the 12 held out)."""
    write_image_folder(str(tmp_path / "imgs"), ["a", "b", "c"], per_class=10, size=(8, 8))
    result = subprocess.run(
        [sys.executable, "-c", NO_TRAINING.format(root=ROOT), f"--dataset=folder:{tmp_path}/imgs",
         "--image_size=8", f"--baseline={baseline}", "--ipc=3", "--validation=12",
         "--repeats=3", f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"shared 0 of {trained}") == 3, result.stdout
    if baseline == "herding":
        assert "herding features trained on 12 images" in result.stdout  # 24 - 12 held out


def test_sets_of_the_old_32x32_fashion_mnist_are_refused_naming_the_cause(tmp_path):
    """ncfm-keras before 2026-12 stored zero-padded 32x32 Fashion-MNIST sets; 28x28 stays 28x28
    now, and such a set is refused in one line, while a set from another tool in the documented
    format (factor 1, images at the data's shape) evaluates."""
    names = nk.MNIST_FAMILY["fashion_mnist"]
    labels = np.repeat(np.arange(10), 1).astype(np.int32)
    old = tmp_path / "old.npz"
    nk.save_distilled(str(old), nk.DistilledSet(
        np.full((10, 32, 32, 1), 0.5, np.float32), labels, 1, 2, "fashion_mnist", names,
        np.float32([0.286]), np.float32([0.353]), {}))
    _one_line_error(_run(f"--distilled={old}", f"--data_dir={FASHION_MNIST_DIR}", "--epochs=1",
                         f"--output_dir={tmp_path / 'out'}"),
                    "holds 32x32 images", "28x28", "re-distil it with train.py")
    other = tmp_path / "other.npz"
    nk.save_distilled(str(other), nk.DistilledSet(
        np.full((10, 28, 28, 1), 0.5, np.float32), labels, 1, 1, "fashion_mnist", names,
        np.float32([0.286]), np.float32([0.353]), {}))
    result = _run(f"--distilled={other}", f"--data_dir={FASHION_MNIST_DIR}", "--epochs=1",
                  "--repeats=1", f"--output_dir={tmp_path / 'other_eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convnet: final " in result.stdout
