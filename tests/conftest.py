import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ncfm_keras as nk  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Tests that run train.py / evaluate.py / the notebook in subprocesses: marked `slow` (deselect
# them with `-m "not slow"` while working; CI runs every test).
SUBPROCESS_MODULES = {"test_cli", "test_cli_data", "test_distribute", "test_notebook",
                      "test_outputs", "test_resume"}
SUBPROCESS_TESTS = {"test_soft_label_evaluation_end_to_end",
                    "test_too_small_images_fail_before_any_training",
                    "test_finished_networks_survive_a_later_failure",
                    "test_sets_of_the_old_32x32_fashion_mnist_are_refused_naming_the_cause"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the command lines in subprocesses")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SUBPROCESS_MODULES or item.originalname in SUBPROCESS_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist; .ci/run installs it)."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist")
    return nk.load_dataset("fashion_mnist", FASHION_MNIST_DIR)


@pytest.fixture(scope="session")
def small_fashion_mnist(fashion_mnist):
    """Fashion-MNIST with 200 training and 500 test images per class: quick to evaluate on."""
    def per_class(x, y, n):
        idx = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
        return x[idx], y[idx]
    d = fashion_mnist
    x_train, y_train = per_class(d.x_train, d.y_train, 200)
    x_test, y_test = per_class(d.x_test, d.y_test, 50)
    return nk.Dataset(d.name, x_train, y_train, x_test, y_test, d.class_names, d.mean, d.std)


def write_image_folder(root, classes, per_class, size=(20, 24), mode="RGB", seed=0):
    """Writes `root/<class>/<i>.png` images whose brightness encodes the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            base = 40 + 80 * c
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = np.clip(base + rng.integers(-20, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode).save(os.path.join(root, name, f"{i:03d}.png"))
