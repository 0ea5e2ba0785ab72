import gzip
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import ncfm_keras as nk
from conftest import FASHION_MNIST_DIR, write_image_folder


def test_fashion_mnist_from_idx_files(fashion_mnist):
    d = fashion_mnist
    assert d.x_train.shape == (60000, 32, 32, 1) and d.x_test.shape == (10000, 32, 32, 1)
    assert d.x_train.dtype == np.uint8
    assert np.all(d.class_counts() == 6000)
    assert d.class_names[0] == "T-shirt/top" and d.num_classes == 10
    # 28 -> 32 zero padding (spec section 1); statistics of the unpadded images.
    assert d.x_train[:, :2].max() == 0 and d.x_train[:, :, -2:].max() == 0
    assert d.x_train[:, 2:30, 2:30].max() == 255
    np.testing.assert_allclose(d.mean, [0.2860], atol=1e-3)
    np.testing.assert_allclose(d.std, [0.3530], atol=1e-3)


def test_idx_errors(tmp_path):
    with pytest.raises(nk.NCFMError, match="no t10k-images"):
        shutil.copy(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"), tmp_path)
        for f in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copy(os.path.join(FASHION_MNIST_DIR, f), tmp_path)
        open(tmp_path / "t10k-images-idx3-ubyte.gz.bak", "w").close()
        nk.load_dataset("fashion_mnist", str(tmp_path))
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        head = f.read(10000)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(head)
    with pytest.raises(nk.NCFMError, match="truncated"):
        nk.load_dataset("fashion_mnist", str(tmp_path))


def test_missing_and_unknown_datasets(tmp_path):
    with pytest.raises(nk.NCFMError, match="unknown dataset 'no_such_dataset'"):
        nk.load_dataset("no_such_dataset")
    with pytest.raises(nk.NCFMError, match="does not exist"):
        nk.load_dataset("cifar10", str(tmp_path / "absent"))
    with pytest.raises(nk.NCFMError, match="no prepared"):
        nk.load_dataset("fashion_mnist", str(tmp_path))


def prepared_tfds_dir(root, name, examples):
    """A TFDS data dir holding `name`'s metadata as `tfds build` leaves it (no records:
    `tfds.testing.mock_data` supplies the examples)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(root))
    builder.data_path.mkdir(parents=True)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[examples], num_bytes=0)
        for s in ("train", "test")]))
    builder.info.write_to_directory(builder.data_path)
    return str(root)


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
    """A prepared dataset is read without any network access (the proxy refuses all)."""
    import tensorflow_datasets as tfds

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    data_dir = prepared_tfds_dir(tmp_path, "cifar10", 30)
    with tfds.testing.mock_data(num_examples=30, data_dir=data_dir):
        d = nk.load_dataset("cifar10", data_dir)
    assert d.x_train.shape == (30, 32, 32, 3) and d.x_test.shape == (30, 32, 32, 3)
    assert d.x_train.dtype == np.uint8 and d.y_train.max() < 10
    assert len(d.class_names) == 10  # names come with the real download
    assert d.mean.shape == (3,) and np.all(d.std > 0)


def test_folder_dataset_split_and_resize(tmp_path):
    write_image_folder(str(tmp_path), ["cat", "dog", "fox"], per_class=10)
    d = nk.load_dataset(f"folder:{tmp_path}", image_size=16)
    assert d.class_names == ["cat", "dog", "fox"]
    assert d.x_train.shape == (24, 16, 16, 3) and d.x_test.shape == (6, 16, 16, 3)
    assert list(d.class_counts()) == [8, 8, 8]
    # Brightness encodes the class, so the labels must follow the folders.
    brightness = d.x_train.reshape(24, -1).mean(1)
    for c in range(3):
        assert np.all(np.abs(brightness[d.y_train == c] - (40 + 80 * c)) < 15)


def test_folder_dataset_explicit_split_and_grayscale(tmp_path):
    write_image_folder(str(tmp_path / "train"), ["a", "b"], 4, mode="L")
    write_image_folder(str(tmp_path / "test"), ["a", "b"], 2, mode="L", seed=1)
    d = nk.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert d.x_train.shape == (8, 8, 8, 1) and d.x_test.shape == (4, 8, 8, 1)


@pytest.mark.parametrize("classes,per_class,message", [
    ([], 0, "0 class sub-directories"),
    (["only"], 3, "1 class sub-directories"),
    (["a", "b"], 0, "holds no images"),
    (["a", "b"], 1, "at least two"),
])
def test_bad_folders(tmp_path, classes, per_class, message):
    for c in classes:
        os.makedirs(tmp_path / c)
    write_image_folder(str(tmp_path), classes, per_class)
    with pytest.raises(nk.NCFMError, match=message):
        nk.load_dataset(f"folder:{tmp_path}")
    with pytest.raises(nk.NCFMError, match="does not exist"):
        nk.load_dataset(f"folder:{tmp_path}/nothing")


def _labelled_by_pixels(num_classes=3, per_class=7):
    """A tiny dataset whose every pixel equals its class index."""
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = np.broadcast_to(y[:, None, None, None], (len(y), 4, 4, 1)).astype(np.uint8)
    return nk.Dataset("toy", x, y, x, y, [str(c) for c in range(num_classes)],
                      np.zeros(1, np.float32), np.ones(1, np.float32))


def test_class_balanced_batches():
    d = _labelled_by_pixels()
    batches = list(nk.class_balanced_batches(d, batch_per_class=5).take(4))
    for b in batches:
        assert b.shape == (3, 5, 4, 4, 1) and b.dtype == tf.uint8
        for c in range(3):
            assert np.all(b[c].numpy() == c)


def test_random_subset_and_ipc_checks(fashion_mnist):
    x, y = nk.random_subset(fashion_mnist, ipc=10, seed=3)
    assert x.shape == (100, 32, 32, 1) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert np.all(np.bincount(y) == 10)
    assert len(np.unique(x.reshape(100, -1), axis=0)) == 100
    x2, _ = nk.random_subset(fashion_mnist, ipc=10, seed=3)
    np.testing.assert_array_equal(x, x2)
    for bad in (0, -1, 6001):
        with pytest.raises(nk.NCFMError, match=f"ipc={bad} is out of range: use 1..6000"):
            nk.random_subset(fashion_mnist, bad)


def test_validation_split_tests_on_held_out_training_images(fashion_mnist):
    val = nk.validation_split(fashion_mnist, 500)
    assert val.x_test.shape == (500, 32, 32, 1) and len(val.y_test) == 500
    train_rows = {row.tobytes() for row in fashion_mnist.x_train.reshape(60000, -1)}
    assert all(row.tobytes() in train_rows for row in val.x_test.reshape(500, -1))
    assert len(np.unique(val.x_test.reshape(500, -1), axis=0)) == 500  # no repeats
    assert len(np.unique(val.y_test)) == 10
    np.testing.assert_array_equal(nk.validation_split(fashion_mnist, 500).x_test, val.x_test)
    assert fashion_mnist.x_test.shape[0] == 10000  # the original is untouched
    for bad in (0, 60001):
        with pytest.raises(nk.NCFMError, match=f"validation size {bad} is out of range"):
            nk.validation_split(fashion_mnist, bad)


def test_herding_picks_the_images_nearest_the_mean():
    d = _labelled_by_pixels(num_classes=2, per_class=5)
    d.x_train = d.x_train.copy()
    d.x_train[:, 0, 0, 0] += np.array([9, 1, 5, 0, 7, 9, 1, 5, 0, 7], np.uint8)
    # features = the perturbed pixel; class means 4.4 and 5.4 -> first pick nearest it.
    x, y = nk.herding_subset(d, 1, lambda im: im[:, 0, 0, :] * 255.0)
    assert list(y) == [0, 1]
    assert round(x[0, 0, 0, 0] * 255) == 5 and round(x[1, 0, 0, 0] * 255) == 6


def test_class_balanced_batches_restart_anywhere_and_cycle_each_class(fashion_mnist):
    stream = list(nk.class_balanced_batches(fashion_mnist, 100, seed=4).take(5))
    resumed = list(nk.class_balanced_batches(fashion_mnist, 100, seed=4, start=3).take(2))
    np.testing.assert_array_equal(stream[3], resumed[0])
    np.testing.assert_array_equal(stream[4], resumed[1])
    other = next(iter(nk.class_balanced_batches(fashion_mnist, 100, seed=5)))
    assert not np.array_equal(stream[0], other)
    # 5 batches of 100 < 6000 images per class: no image of a class is drawn twice.
    for c in range(10):
        drawn = np.concatenate([s[c].numpy().reshape(100, -1) for s in stream])
        assert len(np.unique(drawn, axis=0)) == len(drawn)
