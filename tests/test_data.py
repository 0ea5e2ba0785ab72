import dataclasses
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
    # 28x28 kept as it is (the networks pad it after normalisation, as the official code does)
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.x_train.dtype == np.uint8
    assert np.all(d.class_counts() == 6000)
    assert d.class_names[0] == "T-shirt/top" and d.num_classes == 10
    # The official code's constants for Fashion-MNIST, close to the data's own statistics.
    np.testing.assert_array_equal(d.mean, np.float32([0.2861]))
    np.testing.assert_array_equal(d.std, np.float32([0.3530]))
    pixels = d.x_train.astype(np.float64) / 255.0
    np.testing.assert_allclose([pixels.mean(), pixels.std()], [0.2861, 0.3530], atol=2e-4)


def test_normalisation_is_the_official_table_for_known_datasets_else_the_data():
    x = np.full((4, 8, 8, 3), 51, np.uint8)  # every pixel 0.2
    x[0, 0, 0] = 255
    mean, std = nk.normalization("cifar10", x)
    np.testing.assert_array_equal(mean, np.float32([0.4914, 0.4822, 0.4465]))
    np.testing.assert_array_equal(std, np.float32([0.2023, 0.1994, 0.2010]))
    np.testing.assert_array_equal(nk.normalization("imagenette/320px", x)[0],
                                  np.float32([0.485, 0.456, 0.406]))
    mean, std = nk.normalization("folder:/data/cifar10", x)  # a folder: its own statistics
    pixels = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
    # One channel where the table has three (a grayscale copy): the data's statistics.
    np.testing.assert_allclose(nk.normalization("cifar10", x[..., :1])[0], pixels[:, 0].mean())
    assert nk.normalization("toy", np.zeros((2, 4, 4, 1), np.uint8))[1] == 1.0  # constant


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


@pytest.mark.parametrize("content,message", [
    (b"", "is not an uint8 IDX file"),  # zero bytes
    (b"\x00\x00\x08\x03\x00\x00", "is not an uint8 IDX file"),  # the header cut short
    ("cut", "cannot be read (Compressed file ended"),  # a download cut short
    (b"<html>404</html>", "cannot be read (Not a gzipped file"),
])
def test_idx_files_cut_short_or_corrupt(tmp_path, content, message):
    for name in os.listdir(FASHION_MNIST_DIR):
        if name.startswith("t10k"):
            shutil.copy(os.path.join(FASHION_MNIST_DIR, name), tmp_path)
    shutil.copy(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"), tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    if content == "cut":
        content = open(os.path.join(FASHION_MNIST_DIR, images.name), "rb").read()[:100000]
    elif content.startswith(b"\x00"):
        content = gzip.compress(content)
    images.write_bytes(content)
    with pytest.raises(nk.NCFMError, match=f"{images}.*{message}".replace("(", r"\(")):
        nk.load_dataset("fashion_mnist", str(tmp_path))


def test_missing_and_unknown_datasets(tmp_path):
    with pytest.raises(nk.NCFMError, match="unknown dataset 'no_such_dataset'"):
        nk.load_dataset("no_such_dataset")
    with pytest.raises(nk.NCFMError, match="does not exist"):
        nk.load_dataset("cifar10", str(tmp_path / "absent"))
    with pytest.raises(nk.NCFMError, match="no prepared"):
        nk.load_dataset("fashion_mnist", str(tmp_path))


def test_dataset_names_as_people_write_them(fashion_mnist):
    """`--dataset=Fashion_MNIST` (or fashion-mnist) with the IDX files in --data_dir was told
    the folder holds no prepared TFDS dataset. The names of TFDS and torchvision, any case,
    '-' or '_', load the canonical dataset: the same name, digest and pool key."""
    for spelling in ("Fashion_MNIST", "fashion-mnist", "FashionMNIST", "Fashion-MNIST"):
        d = nk.load_dataset(spelling, FASHION_MNIST_DIR)
        assert d.name == "fashion_mnist" and d.digest == fashion_mnist.digest
        np.testing.assert_array_equal(d.mean, fashion_mnist.mean)  # the official constants
    spellings = {"MNIST": "mnist", "KMNIST": "kmnist", "CIFAR-10": "cifar10",
                 "CIFAR10": "cifar10", "cifar_100": "cifar100", "CIFAR-100": "cifar100",
                 "SVHN": "svhn_cropped", "Fashion MNIST": "fashion_mnist",
                 "Oxford-IIIT-Pet": "oxford_iiit_pet", "Imagenette/320px": "imagenette/320px",
                 "imagenette/full-size-v2": "imagenette/full-size-v2",  # configs as given
                 "Folder:Data/Clothes": "folder:Data/Clothes"}
    for spelling, name in spellings.items():
        assert nk.dataset_name(spelling) == name, spelling
    assert nk.preset("CIFAR-100", 10).batch_real == 256  # the cifar100 preset
    with pytest.raises(nk.NCFMError, match="unknown dataset 'fashion_mnst' .* did you mean "
                                           "fashion_mnist?"):
        nk.load_dataset("Fashion-MNST", FASHION_MNIST_DIR)
    with pytest.raises(nk.NCFMError) as error:
        nk.load_dataset("no_such_dataset")
    assert "did you mean" not in str(error.value)  # nothing near: no far-fetched guess


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


def test_first_real_batches_repeat_each_class_first_images():
    """The official loader's real batch: each class's first images, the same every iteration."""
    d = _labelled_by_pixels(num_classes=3, per_class=4)
    d.x_train = d.x_train.copy()
    d.x_train[:, 0, 0, 0] = np.arange(len(d.x_train))  # each image's index, in data order
    batches = list(nk.class_balanced_batches(d, 6, seed=1, order="first").take(3))
    for c in range(3):
        mine = np.flatnonzero(d.y_train == c)
        expected = mine[[0, 1, 2, 3, 0, 1]]  # the first 6 of 4: cycled
        for b in batches:
            np.testing.assert_array_equal(b[c, :, 0, 0, 0].numpy(), expected)
    with pytest.raises(nk.NCFMError, match="order='sorted': use shuffled or first"):
        nk.class_balanced_batches(d, 2, order="sorted")


def test_random_subset_and_ipc_checks(fashion_mnist):
    x, y = nk.random_subset(fashion_mnist, ipc=10, seed=3)
    assert x.shape == (100, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert np.all(np.bincount(y) == 10)
    assert len(np.unique(x.reshape(100, -1), axis=0)) == 100
    x2, _ = nk.random_subset(fashion_mnist, ipc=10, seed=3)
    np.testing.assert_array_equal(x, x2)
    for bad in (0, -1, 6001):
        with pytest.raises(nk.NCFMError, match=f"ipc={bad} is out of range: use 1..6000"):
            nk.random_subset(fashion_mnist, bad)


def test_validation_split_tests_on_held_out_training_images(fashion_mnist):
    val = nk.validation_split(fashion_mnist, 500)
    assert val.x_test.shape == (500, 28, 28, 1) and len(val.y_test) == 500
    train_rows = {row.tobytes() for row in fashion_mnist.x_train.reshape(60000, -1)}
    assert all(row.tobytes() in train_rows for row in val.x_test.reshape(500, -1))
    assert len(np.unique(val.x_test.reshape(500, -1), axis=0)) == 500  # no repeats
    assert len(np.unique(val.y_test)) == 10
    np.testing.assert_array_equal(nk.validation_split(fashion_mnist, 500).x_test, val.x_test)
    assert fashion_mnist.x_test.shape[0] == 10000  # the original is untouched
    assert len(val.x_train) == 60000 - 500  # held out of the training split
    for bad in (0, 60000):
        with pytest.raises(nk.NCFMError, match=f"validation size {bad} is out of range"):
            nk.validation_split(fashion_mnist, bad)


def test_validation_images_are_never_drawn_or_selected_for_training():
    """evaluate.py --validation=160 --baseline=random drew the baseline from a training split
    that still held the validation images (about 40 of 80 shared)."""
    d = _labelled_by_pixels(num_classes=3, per_class=20)
    d.x_train = d.x_train.copy()
    d.x_train[:, 0, 0, 0] = np.arange(len(d.x_train))  # every image unique: its index
    val = nk.validation_split(d, 30)
    held_out = set(val.x_test[:, 0, 0, 0].tolist())
    assert len(held_out) == 30 and len(val.x_train) == 30
    assert held_out.isdisjoint(val.x_train[:, 0, 0, 0].tolist())
    for seed in range(5):
        x, _ = nk.random_subset(val, 3, seed)
        assert held_out.isdisjoint(np.round(x[:, 0, 0, 0] * 255).astype(int).tolist())
    x, _ = nk.herding_subset(val, 3, lambda images: images[:, 0, 0, :])
    assert held_out.isdisjoint(np.round(x[:, 0, 0, 0] * 255).astype(int).tolist())
    with pytest.raises(nk.NCFMError, match="validation size 59 leaves class '.' no training"):
        nk.validation_split(d, 59)


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


# --- Folder datasets as they come in the field -----------------------------------------------

def _png_bytes(value=128, size=(6, 6)):
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hidden_entries_and_os_metadata_are_never_data(tmp_path, capsys):
    clean, messy = tmp_path / "clean", tmp_path / "messy"
    write_image_folder(str(clean), ["cat", "dog", "fox"], per_class=5)
    shutil.copytree(clean, messy)
    junk = {  # what Colab, macOS, Windows and NAS boxes leave beside the data
        ".ipynb_checkpoints/000-checkpoint.png": _png_bytes(),
        "__MACOSX/cat/._000.png": b"\x00\x05\x16\x07 AppleDouble",
        "@eaDir/000.png/SYNOPHOTO_THUMB_S.png": _png_bytes(),
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "cat/._000.png": b"\x00\x05\x16\x07 AppleDouble",
        "cat/.DS_Store": b"Bud1",
        "dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "dog/desktop.ini": b"[.ShellClassInfo]",
        "fox/.ipynb_checkpoints/004-checkpoint.png": _png_bytes(),
        "fox/.hidden.png": _png_bytes(),
    }
    for name, content in junk.items():
        os.makedirs(os.path.dirname(messy / name), exist_ok=True)
        (messy / name).write_bytes(content)
    for train in (False, True):  # beside the class folders and inside a train/ split
        root = messy
        if train:
            root = tmp_path / "split"
            shutil.copytree(messy, root / "train")
            shutil.copytree(messy, root / "test")
            os.makedirs(root / ".ipynb_checkpoints")
        d = nk.load_dataset(f"folder:{root}")
        assert d.class_names == ["cat", "dog", "fox"]
        assert list(d.class_counts()) == ([5, 5, 5] if train else [4, 4, 4])
    assert capsys.readouterr().err == ""  # no file was even tried
    assert nk.load_dataset(f"folder:{messy}").digest == nk.load_dataset(f"folder:{clean}").digest


def test_unreadable_images_are_skipped_with_one_warning_line(tmp_path, capsys):
    write_image_folder(str(tmp_path), ["cat", "dog", "fox"], per_class=5)
    whole = (tmp_path / "dog" / "000.png").read_bytes()
    (tmp_path / "cat" / "x.png").write_bytes(b"")  # zero bytes
    (tmp_path / "dog" / "cut.png").write_bytes(whole[:len(whole) // 2])  # cut short
    (tmp_path / "fox" / "notes.jpg").write_text("not an image")
    (tmp_path / "fox" / "gone.png").symlink_to(tmp_path / "absent.png")  # a broken link
    d = nk.load_dataset(f"folder:{tmp_path}")
    assert list(d.class_counts()) + list(np.bincount(d.y_test)) == [4, 4, 4, 1, 1, 1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: left out 4 of 19 files in {tmp_path} (4 unreadable): ")
    # Each named with its exception's own first line (Pillow's without the path it repeats).
    assert ("cat/x.png (cannot identify image file), dog/cut.png (image file is truncated"
            in lines[0])
    assert "fox/gone.png (No such file or directory), ..." in lines[0]
    assert "Traceback" not in lines[0] and str(tmp_path / "cat") not in lines[0]


def test_folders_with_too_few_readable_images(tmp_path, capsys):
    write_image_folder(str(tmp_path), ["cat", "dog"], per_class=1)
    (tmp_path / "dog" / "broken.png").write_bytes(b"")
    (tmp_path / "cat" / "more.png").write_bytes(_png_bytes())
    with pytest.raises(nk.NCFMError, match="class 'dog' in .* has 1 readable image"):
        nk.load_dataset(f"folder:{tmp_path}")
    for png in tmp_path.glob("*/*.png"):
        png.write_bytes(b"\x89PNG")
    capsys.readouterr()
    with pytest.raises(nk.NCFMError, match="none of the 4 image files .* could be read"):
        nk.load_dataset(f"folder:{tmp_path}")
    assert capsys.readouterr().err == ""  # the error is the one line


def test_downloaded_layouts(tmp_path):
    classes = ["n01", "n02", "n03"]
    # Imagenette: train/ + val/ with the same class folders; ImageNet adds an unlabelled test/.
    write_image_folder(str(tmp_path / "nette" / "train"), classes, 4)
    write_image_folder(str(tmp_path / "nette" / "val"), classes, 2, seed=1)
    os.makedirs(tmp_path / "nette" / "test")
    (tmp_path / "nette" / "test" / "x.png").write_bytes(_png_bytes())
    (tmp_path / "nette" / "noisy_imagenette.csv").write_text("path,label\n")
    d = nk.load_dataset(f"folder:{tmp_path / 'nette'}", image_size=8)
    assert d.x_train.shape[0] == 12 and d.x_test.shape[0] == 6 and d.class_names == classes
    # CINIC-10: train/, valid/ and test/ all labelled -> test/ is the test split.
    for split, n in (("train", 3), ("valid", 2), ("test", 4)):
        write_image_folder(str(tmp_path / "cinic" / split), classes, n)
    assert nk.load_dataset(f"folder:{tmp_path / 'cinic'}", image_size=8).x_test.shape[0] == 12
    # Tiny ImageNet: <class>/images/*.JPEG, a flat val/ labelled by a text file, no test labels.
    tiny = tmp_path / "tiny"
    for c in classes:
        write_image_folder(str(tiny / "train" / c), ["images"], 5, mode="RGB")
        for png in (tiny / "train" / c / "images").glob("*.png"):
            from PIL import Image
            Image.open(png).save(png.with_suffix(".JPEG"))
            png.unlink()
        (tiny / "train" / c / f"{c}_boxes.txt").write_text("")
    write_image_folder(str(tiny / "val"), ["images"], 3)
    (tiny / "val" / "val_annotations.txt").write_text("")
    write_image_folder(str(tiny / "test"), ["images"], 3)
    (tiny / "wnids.txt").write_text("\n".join(classes))
    with pytest.raises(nk.NCFMError) as error:
        nk.load_dataset(f"folder:{tiny}")
    message = str(error.value)
    assert "expected test/ or val/ to hold the 3 class folders of train/" in message
    assert "val/ holds images/, val_annotations.txt" in message
    assert f"folder:{tiny / 'train'} to hold out 20% of each class" in message
    d = nk.load_dataset(f"folder:{tiny / 'train'}", image_size=8)  # nested images are found
    assert d.class_names == classes and list(d.class_counts()) == [4, 4, 4]
    # train/ alone: the test split is held out of it.
    write_image_folder(str(tmp_path / "alone" / "train"), classes, 5)
    assert nk.load_dataset(f"folder:{tmp_path / 'alone'}").x_test.shape[0] == 3


def test_layout_errors_say_what_was_expected_and_found(tmp_path):
    classes = ["bus", "car", "train"]  # a class may be called train: it holds images
    write_image_folder(str(tmp_path / "vehicles"), classes, 3)
    assert nk.load_dataset(f"folder:{tmp_path / 'vehicles'}").class_names == classes
    write_image_folder(str(tmp_path / "partial" / "train"), ["a", "b", "c"], 3)
    write_image_folder(str(tmp_path / "partial" / "val"), ["a", "b"], 3)
    with pytest.raises(nk.NCFMError, match="val/ lacks c;"):
        nk.load_dataset(f"folder:{tmp_path / 'partial'}")
    write_image_folder(str(tmp_path / "mixed" / "train"), ["a", "b"], 3)
    write_image_folder(str(tmp_path / "mixed" / "test"), ["a", "b"], 3)
    write_image_folder(str(tmp_path / "mixed" / "extra"), ["a", "b"], 3)
    with pytest.raises(nk.NCFMError, match=r"mixes train/ with other folders \(extra\)"):
        nk.load_dataset(f"folder:{tmp_path / 'mixed'}")
    # Training/ + Testing/ (Kaggle's brain-tumour MRI set), a disk's lost+found beside them.
    write_image_folder(str(tmp_path / "mri" / "Training"), ["glioma", "none"], 3)
    write_image_folder(str(tmp_path / "mri" / "Testing"), ["glioma", "none"], 1)
    os.makedirs(tmp_path / "mri" / "lost+found")
    assert nk.load_dataset(f"folder:{tmp_path / 'mri'}").x_test.shape[0] == 2
    # One folder wrapping the classes (as many archives extract), and the archive itself.
    write_image_folder(str(tmp_path / "wrapped" / "seg_train"), ["a", "b"], 3)
    with pytest.raises(nk.NCFMError, match=f"pass folder:{tmp_path}/wrapped/seg_train$"):
        nk.load_dataset(f"folder:{tmp_path / 'wrapped'}")
    shutil.make_archive(str(tmp_path / "clothes"), "zip", tmp_path / "mri")
    with pytest.raises(nk.NCFMError, match="clothes.zip is a file, not a folder; extract it"):
        nk.load_dataset(f"folder:{tmp_path / 'clothes.zip'}")
    os.makedirs(tmp_path / "flat" / "only")
    (tmp_path / "flat" / "only" / "a.txt").write_text("notes")
    os.makedirs(tmp_path / "flat" / "other")
    with pytest.raises(nk.NCFMError, match=r"holds no images .* \(only/ holds a.txt\)"):
        nk.load_dataset(f"folder:{tmp_path / 'flat'}")
    (tmp_path / "flat" / "only" / "a.tif").write_bytes(b"II*\x00")  # a TIFF header, no image
    with pytest.raises(nk.NCFMError, match=r"none of the 1 image files .* \(e.g. only/a.tif \("):
        nk.load_dataset(f"folder:{tmp_path / 'flat'}")


def test_image_kinds_names_and_links(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    kinds = {
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "bilevel.bmp": Image.fromarray(rgb[..., 0] > 127),
        "grey16.png": Image.fromarray(np.full((10, 12), 0x8080, np.uint16)),
    }
    os.makedirs(root / "çà")
    for name, image in kinds.items():
        image.save(root / "çà" / name)
    write_image_folder(str(tmp_path / "elsewhere"), ["long tail"], 20)
    (root / "long tail").symlink_to(tmp_path / "elsewhere" / "long tail")  # a linked class
    (root / "long tail" / "loop").symlink_to(root / "long tail")  # a link back up is read once
    d = nk.load_dataset(f"folder:{root}", image_size=12)
    assert d.class_names == ["long tail", "çà"] and list(d.class_counts()) == [16, 4]
    assert d.x_train.shape[1:] == (12, 12, 3)
    # In path order, çà's training images are bilevel, cmyk, grey16, palette (rgba is tested).
    np.testing.assert_array_equal(d.x_train[d.y_train == 1][2], 128)  # 16 bits: the high byte


def test_every_format_pillow_reads_is_read(tmp_path, capsys):
    """A class folder of PNG, WebP and TIFF files loaded only the PNGs, without a word; a
    WebP-only class had '0 readable image(s)'. Files of no image format are named."""
    from PIL import Image
    root = tmp_path / "data"
    write_image_folder(str(root), ["mixed", "webp"], per_class=3)
    formats = ("webp", "tif", "tiff", "jpg", "bmp", "gif", "ppm", "pgm")
    for png in sorted((root / "mixed").glob("*.png")):
        for extension in formats:
            image = Image.open(png)
            if extension == "pgm":
                image = image.convert("L")
            image.save(png.with_name(f"{png.stem}_{extension}.{extension}"))
    for png in (root / "webp").glob("*.png"):
        Image.open(png).save(png.with_suffix(".webp"), lossless=True)
        png.unlink()
    (root / "mixed" / "notes.txt").write_text("shot on 2026-11-02")
    (root / "mixed" / "labels.csv").write_text("file,label\n")
    d = nk.load_dataset(f"folder:{root}", image_size=8)
    counts = list(d.class_counts() + np.bincount(d.y_test))
    assert counts == [3 * (1 + len(formats)), 3]
    warning = capsys.readouterr().err.strip()
    assert warning == (f"warning: left out 2 of 32 files in {root} (2 not images): "
                       "mixed/labels.csv (not a format Pillow reads), mixed/notes.txt (not a "
                       "format Pillow reads)")
    for extension in (".png", ".jpg", ".webp", ".tif", ".bmp", ".gif", ".ppm", ".pgm"):
        assert extension in nk.image_extensions()
    assert ".pdf" not in nk.image_extensions()  # Pillow writes PDF, it does not read it


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    """Phone JPEGs store the sensor's pixels and a tag saying how to turn them (EXIF
    orientation 6: rotate 90 degrees clockwise); they were trained on sideways."""
    from PIL import Image
    write_image_folder(str(tmp_path), ["a", "b"], per_class=3)
    stored = np.zeros((12, 24), np.uint8)  # 24 wide, 12 high: left half white
    stored[:, :12] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns it clockwise, left becomes top
    Image.fromarray(stored).convert("RGB").save(tmp_path / "a" / "photo.jpg", exif=exif)
    d = nk.load_dataset(f"folder:{tmp_path}", image_size=8)
    photo = d.x_test[d.y_test == 0][0, ..., 0]  # the last of a/ in path order: held out
    assert photo[:3].min() > 200 and photo[-3:].max() < 50  # white on top, as shown


def test_images_over_pillows_decompression_bomb_limit_are_read(tmp_path, monkeypatch, capsys):
    """A valid 180-megapixel scan was skipped as 'could not be read': Pillow refuses images over
    twice MAX_IMAGE_PIXELS (89 megapixels). Here the limit is lowered to 100 pixels, so that
    the 20x24 images of the folder are over it, instead of writing a 180-megapixel file."""
    from PIL import Image
    write_image_folder(str(tmp_path), ["a", "b"], per_class=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    d = nk.load_dataset(f"folder:{tmp_path}", image_size=8)
    assert len(d.y_train) + len(d.y_test) == 6
    assert capsys.readouterr().err == ""
    assert Image.MAX_IMAGE_PIXELS == 100  # lifted while the folder is read, then restored


def _refused(path):
    return PermissionError(13, "Permission denied", str(path))


def test_permission_errors_are_named_not_guessed_at(tmp_path, monkeypatch, capsys):
    """On a shared server a file one may not read was reported as a file to re-create or
    delete. Every error and warning now carries the exception's own first line, and a
    PermissionError is told to check permissions. (The tests may run as root, whom chmod does
    not stop: the refusals are injected.)"""
    from PIL import Image
    write_image_folder(str(tmp_path / "data"), ["cat", "dog"], per_class=4)
    secret = tmp_path / "data" / "dog" / "001.png"
    real_open = Image.open

    def image_open(path, *args, **kwargs):
        if str(path) == str(secret):
            raise _refused(path)
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", image_open)
        nk.load_dataset(f"folder:{tmp_path / 'data'}", image_size=8)
    assert "dog/001.png (Permission denied)" in capsys.readouterr().err
    # A class folder one may not list: os.walk skipped it without a word.
    real_scandir = os.scandir
    unlisted = tmp_path / "data" / "cat"

    def scandir(path="."):
        if str(path) == str(unlisted):
            raise _refused(path)
        return real_scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        with pytest.raises(nk.NCFMError) as error:
            nk.load_dataset(f"folder:{tmp_path / 'data'}", image_size=8)
    assert str(error.value) == (f"{unlisted} cannot be read (Permission denied); check its "
                                "permissions and those of the folders above it")
    # A folder above the data that one may not enter: os.path.isdir said "does not exist".
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path) == str(tmp_path / "data"):
            raise _refused(path)
        return real_stat(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "stat", stat)
        with pytest.raises(nk.NCFMError, match=r"data cannot be read \(Permission denied\); "
                           "check its permissions"):
            nk.load_dataset(f"folder:{tmp_path / 'data'}")
    # IDX files, a cached pool member and a distilled set: the cause, not "re-install",
    # "delete it" or "re-create it".
    def gzip_open(path, mode):
        raise _refused(path)

    with monkeypatch.context() as patch:
        patch.setattr(nk.gzip, "open", gzip_open)
        with pytest.raises(nk.NCFMError) as error:
            nk.load_dataset("fashion_mnist", FASHION_MNIST_DIR)
    assert "(Permission denied); check its permissions" in str(error.value)
    assert "re-install" not in str(error.value)
    member = tmp_path / "member-000.npz"
    np.savez(member, init_0=np.zeros(1), trained_0=np.ones(1))
    distilled = tmp_path / "distilled.npz"
    distilled.write_bytes(b"")
    real_load = np.load

    def load(path, *args, **kwargs):
        if str(path) in (str(member), str(distilled)):
            raise _refused(path)
        return real_load(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(np, "load", load)
        for read, path, fix in ((nk.read_pool_member, member, "delete it"),
                                (nk.load_distilled, distilled, "re-create")):
            with pytest.raises(nk.NCFMError) as error:
                read(str(path))
            message = str(error.value)
            assert "(Permission denied); check its permissions" in message, message
            assert fix not in message


def test_digest_identifies_the_data_not_its_spelling(tmp_path, monkeypatch):
    write_image_folder(str(tmp_path / "a" / "clothes"), ["shirt", "bag"], 4)
    write_image_folder(str(tmp_path / "b" / "clothes"), ["shirt", "bag"], 4, seed=1)
    monkeypatch.chdir(tmp_path / "a")
    here = nk.load_dataset("folder:clothes")
    assert here.name == f"folder:{tmp_path / 'a' / 'clothes'}"  # absolute, whatever the spelling
    same = nk.load_dataset(f"folder:{tmp_path}/a/../a/clothes/")
    assert same.name == here.name and same.digest == here.digest
    monkeypatch.chdir(tmp_path / "b")
    other = nk.load_dataset("folder:clothes")  # same name, counts and classes; other images
    assert list(other.class_counts()) == list(here.class_counts())
    assert other.digest != here.digest
    assert nk.pool_key(other, "convnet", 0, 0) != nk.pool_key(here, "convnet", 0, 0)
    assert nk.pool_key(same, "convnet", 0, 0) == nk.pool_key(here, "convnet", 0, 0)
    # The file order does not matter; a label, a pixel or a split does.
    order = np.random.default_rng(0).permutation(len(here.y_train))
    shuffled = dataclasses.replace(here, x_train=here.x_train[order], y_train=here.y_train[order])
    assert shuffled.digest == here.digest
    pixel = here.x_test.copy()
    pixel[0, 0, 0, 0] ^= 1
    relabelled = here.y_train.copy()
    relabelled[0] = 1 - relabelled[0]
    for changed in (dict(x_test=pixel), dict(y_train=relabelled),
                    dict(x_train=here.x_test, y_train=here.y_test, x_test=here.x_train,
                         y_test=here.y_train)):
        assert dataclasses.replace(here, **changed).digest != here.digest


def test_pretrained_pools_of_other_images_are_not_shared(tmp_path, monkeypatch):
    write_image_folder(str(tmp_path / "a" / "clothes"), ["shirt", "bag"], 4)
    write_image_folder(str(tmp_path / "b" / "clothes"), ["shirt", "bag"], 4, seed=1)
    for project in ("a", "b", "a"):  # two projects, each with its own data/clothes
        monkeypatch.chdir(tmp_path / project)
        data = nk.load_dataset("folder:clothes", image_size=8)
        data.name = "folder:clothes"  # as it was named before paths were made absolute
        nk.pretrain_pool(data, 1, 0, str(tmp_path / "pools"), verbose=0)
    assert len(os.listdir(tmp_path / "pools")) == 2
    member = tmp_path / "pools" / nk.pool_key(data, "convnet", 0, 0) / "member-000.npz"
    member.write_bytes(member.read_bytes()[:100])  # a cached member cut short
    with pytest.raises(nk.NCFMError, match=f"pool member {member} cannot be read .* delete it"):
        nk.pretrain_pool(data, 1, 0, str(tmp_path / "pools"), verbose=0)
    with pytest.raises(nk.NCFMError, match=f"pool member {member} cannot be read .* delete it"):
        nk.load_teacher(data, str(tmp_path / "pools"), nk.pool_key(data, "convnet", 0, 0))


def test_idx_and_distilled_files_record_their_data(tmp_path, fashion_mnist):
    assert fashion_mnist.data_dir == FASHION_MNIST_DIR and len(fashion_mnist.digest) == 16
    distilled = nk.DistilledSet(np.zeros((10, 8, 8, 1), np.float32), np.arange(10), 1, 2,
                                fashion_mnist.name, fashion_mnist.class_names,
                                fashion_mnist.mean, fashion_mnist.std, {},
                                data_dir=fashion_mnist.data_dir,
                                data_digest=fashion_mnist.digest)
    nk.save_distilled(str(tmp_path / "new.npz"), distilled)
    loaded = nk.load_distilled(str(tmp_path / "new.npz"))
    assert (loaded.data_dir, loaded.data_digest) == (FASHION_MNIST_DIR, fashion_mnist.digest)
    # Files written before data digests were recorded still load.
    nk.save_distilled(str(tmp_path / "old.npz"), dataclasses.replace(
        distilled, data_dir=None, data_digest=None))
    with np.load(tmp_path / "old.npz") as f:
        assert "data_digest" not in f.files
    old = nk.load_distilled(str(tmp_path / "old.npz"))
    assert old.data_digest is None and old.dataset == "fashion_mnist"
