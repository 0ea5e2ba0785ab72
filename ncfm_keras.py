"""ncfm-keras: dataset distillation with Neural Characteristic Functions, in Keras 3.

NCFM (Wang et al., "Dataset Distillation with Neural Characteristic Function: A Minmax
Perspective", CVPR 2025, arXiv 2502.20653) learns a few synthetic images per class (IPC) whose
*features*, under a pool of pretrained ConvNets, have the real data's characteristic function
(CF) at the frequencies that a small sampling network psi picks to tell them apart: the images
minimise the CF discrepancy while psi maximises it, one round of this min-max game per
`NCFM.train_step`.

The module reads top to bottom in the order the data flows:

    configuration  DistillConfig, PRESETS, EvalProtocol, PROTOCOLS
    data           load_dataset (TFDS, IDX files, image folders), baselines,
                   class_balanced_batches
    augmentation   siamese DSA (dsa_parameters, dsa_apply), CutMix
    networks       ConvNet, AlexNet, VGG-11, ResNet-18
    training       train_network: the evaluation and pretraining protocols
    the method     pretrained pool -> synthetic set -> CF loss (Eq. 6-8) -> psi (Sec. 4.2.2) ->
                   (several devices, non-finite steps) -> NCFM, whose train_step is one
                   iteration
    evaluation     evaluate_images, soft-label teachers
    files          the distilled-set file, atomic writes
    the distiller  build_distiller: the pool, then a compiled NCFM

What a run of train.py needs around `fit()` (checkpoints, metrics.csv, plots, signals) is in
runs.py beside it.

Distil, then evaluate (Fashion-MNIST from its IDX files, offline; tiny settings; the library
never reads command-line flags, `train.py` and `evaluate.py` do)::

    import ncfm_keras as nk
    data = nk.load_dataset("fashion_mnist", "/usr/share/datasets/fashion-mnist")
    config = nk.DistillConfig(ipc=10, iterations=200, batch_real=256, num_freqs=1024,
                              num_pretrained=2, pretrain_epochs=2)
    model = nk.build_distiller(data, config, pool_dir="pools")
    model.fit(nk.class_balanced_batches(data, config.batch_real), steps_per_epoch=10,
              epochs=config.iterations // 10)  # fit decides the length
    x, y = nk.distilled_set(model, data).decoded()
    print(nk.evaluate_images(x, y, data, protocol="ncfm", epochs=300)["final"])
"""

import dataclasses
import difflib
import functools
import gzip
import hashlib
import json
import math
import os
import stat
import struct
import sys
import tempfile
import threading
import typing
import zipfile
import zlib

import keras
import numpy as np
import tensorflow as tf
from keras import layers


class NCFMError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it."""


class WriteError(NCFMError):
    """An output that could not be written: the message names the file and the cause."""


# --- Configuration: the settings of a distillation, its presets, the training protocols ------

# DistillConfig's enumerated settings.
CHOICES = dict(init=("real", "mix", "noise"),
               init_from=("first", "random", "herding"),
               init_resize=("nearest", "area"),
               real_batch=("shuffled", "first"),
               loss=("cf", "mmd"),
               frequency_draw=("class_views", "per_class", "per_iteration"),
               calibration_augment=("per_class", "per_sample"),
               image_steps=("per_class", "summed"),
               dsa_space=("normalized", "pixel"))


def setting(default, help):
    """A `DistillConfig` field whose `help` is the one text of its meaning (train.py's
    --help)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class DistillConfig:
    """Every setting of a distillation, checked whenever one is made (NCFMError names the first
    invalid one); defaults are the official CIFAR-10 config's unless the help says "ours"."""
    # The synthetic set and where it starts.
    ipc: int = setting(10, "Stored synthetic images per class.")
    factor: int = setting(2, "Multi-formation: each stored image holds factor^2 images.")
    init: str = setting("mix", "Initial images: real, mix (factor^2 real images per stored "
                        "image, official) or noise.")
    init_from: str = setting("first", "The real images the init copies: each class's first "
                             "(official), random ones, or herding's choice on the features of "
                             "pool member 0 (ours).")
    init_resize: str = setting("nearest", "How mix downsamples its cells: nearest (torch's "
                               "interpolate, official) or area.")

    # An iteration's real data.
    iterations: int = setting(20000, "Distillation iterations (official).")
    batch_real: int = setting(1024, "Real images per class per iteration (official CIFAR-10).")
    real_batch: str = setting("shuffled", "The real batch of a class: shuffled, a fresh "
                              "random one every iteration (ours), or first, the same first "
                              "batch_real images every iteration (the official loader).")

    # The frequencies: psi, or t ~ N(0, I).
    num_freqs: int = setting(4096, "M, frequencies of the CF per iteration (official).")
    sampling_net: bool = setting(True, "psi, the min-max sampling network (paper; a psi that "
                                 "trains is ours); false: t ~ N(0, I) (the official configs).")
    sampler_steps: int = setting(1, "psi's ascent steps per iteration.")
    frequency_draw: str = setting("class_views", "Without psi: class_views (ours: one draw "
                                  "of t ~ N(0, I) per iteration, each class's features in their "
                                  "own random signed permutation: the official law per class, "
                                  "faster), per_class (t drawn afresh per class, official) or "
                                  "per_iteration (one t for all classes).")

    # The matching loss and calibration.
    loss: str = setting("cf", "cf (NCFM) or mmd (DM's mean-feature loss, the baseline).")
    alpha: float = setting(0.5, "Weight of the CF amplitude term (official).")
    beta: float = setting(0.5, "Weight of the CF phase term (official).")
    match_scale: float = setting(300.0, "Scale of a class's matching loss (official).")
    calibration: float = setting(1.0, "Weight of the calibration cross-entropy; 0 turns it "
                                 "off (official: 1).")
    calibration_augment: str = setting("per_class", "Calibration's DSA: one draw per class "
                                       "(official) or per_sample.")

    # The optimizers: AdamW on the pixels, SGD on psi.
    image_lr: float = setting(1e-3, "AdamW learning rate of the pixels (official).")
    image_weight_decay: float = setting(5e-4, "AdamW weight decay of the pixels (official).")
    image_steps: str = setting("per_class", "Image updates: one AdamW step per class "
                               "(official) or summed (one step on the summed loss).")
    lr_patience: int = setting(500, "Halve the image learning rate after this many iterations "
                               "without progress (official).")
    sampler_lr: float = setting(1e-3, "SGD learning rate of psi, momentum 0.5 (official).")
    sampler_max_scale: float = setting(2.0, "Bound on psi's scales (ours, see SamplingNet).")
    sampler_weight_decay: float = setting(5e-4, "Weight decay of psi's SGD (official).")

    # Augmentation, the pool, the rest.
    augment: str = setting("color_crop_cutout", "Siamese DSA of matching (official).")
    dsa_space: str = setting("normalized", "DSA on normalised images (official) or pixel.")
    num_pretrained: int = setting(20, "Pool size P: pretrained ConvNets (official).")
    pretrain_epochs: int = setting(60, "Pretraining epochs of each pool member (official).")
    class_group: int = setting(1, "Classes sent through the network at once (memory and "
                               "speed; ours).")
    seed: int = setting(0, "Seed of the pool, the init and every draw of the distillation.")

    def __post_init__(self):  # also runs in `dataclasses.replace`
        at_least = dict(ipc=1, factor=1, iterations=1, batch_real=1, sampler_steps=1,
                        lr_patience=1, num_pretrained=1, pretrain_epochs=0, class_group=1)
        checks = [(getattr(self, k) >= v, f"{k} must be >= {v}") for k, v in at_least.items()]
        checks += [(getattr(self, k) in v, f"{k} must be {', '.join(v[:-1])} or {v[-1]}")
                   for k, v in CHOICES.items()]
        checks += [(self.num_freqs >= 16 and self.num_freqs % 16 == 0,
                    "num_freqs must be a positive multiple of 16"),
                   (self.sampler_max_scale > 1, "sampler_max_scale must be > 1"),
                   (self.calibration >= 0, "calibration must be >= 0"),
                   (self.image_lr > 0 and self.sampler_lr > 0, "learning rates must be > 0")]
        for ok, message in checks:
            if not ok:
                raise NCFMError(f"invalid setting: {message}")
        parse_augment(self.augment)


# What differs from DistillConfig's defaults per dataset: cifar100's is ours (100 classes x
# 1024 real images are too many for one GPU per iteration), tiny_imagenet's that of some
# official commits (see docs/faithfulness.md).
PRESETS = {"cifar100": dict(batch_real=256), "tiny_imagenet": dict(batch_real=128)}


def preset(dataset, ipc):
    """The `DistillConfig` `train.py` starts from for a dataset, by any spelling of its name
    (`CIFAR-100`: see `dataset_name`); unknown names get the defaults."""
    settings = PRESETS.get(dataset_name(dataset), {})
    return dataclasses.replace(DistillConfig(), ipc=ipc, **settings)


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How a fresh network is trained on a labelled set. `dsa_space`: where DSA acts,
    "normalized" (as the official code does; see `dsa_apply`) or "pixel"; `NCFMError` else."""
    name: str
    epochs: int
    batch_size: int
    optimizer: str        # "adamw" or "sgd"
    learning_rate: float
    weight_decay: float
    lr_milestones: tuple  # fractions of training after which the learning rate is multiplied
    lr_factor: float      # ... by this factor
    augment: str          # per-sample DSA ops
    cutmix_prob: float    # probability of CutMix per batch (beta = 1)
    dsa_space: str = "normalized"

    def __post_init__(self):
        if self.dsa_space not in CHOICES["dsa_space"]:
            raise NCFMError(f"dsa_space='{self.dsa_space}' is unknown; use normalized or "
                            "pixel")


# NCFM's official evaluation (AdamW, lr halved at 20/40/60/80 %, DSA + CutMix); DM's (Zhao & Bilen
# 2023), used for the baselines in the literature; the official pretraining of the pool.
PROTOCOLS = {
    "ncfm": EvalProtocol("ncfm", 2000, 128, "adamw", 1e-3, 0.01, (0.2, 0.4, 0.6, 0.8), 0.5,
                         "color_crop_flip_scale_rotate", 0.5),
    "dm": EvalProtocol("dm", 1000, 256, "sgd", 0.01, 5e-4, (0.5,), 0.1,
                       "color_crop_cutout_flip_scale_rotate", 0.0),
    "pretrain": EvalProtocol("pretrain", 60, 128, "sgd", 0.01, 5e-4, (40 / 60, 50 / 60), 0.2,
                             "color_crop", 0.5),
}


# --- Data ------------------------------------------------------------------------------------

MNIST_FAMILY = {"mnist": [str(d) for d in range(10)],
                "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
                "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                  "Shirt", "Sneaker", "Bag", "Ankle boot"]}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")  # each split's images, then its labels
# Dataset names as people write them (torchvision's FashionMNIST, CIFAR-10, "Fashion MNIST"),
# compared in lower case without '-', '_' and spaces -> the TFDS name this module keys on.
SPELLINGS = {"mnist": "mnist", "fashionmnist": "fashion_mnist", "kmnist": "kmnist",
             "cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped",
             "svhncropped": "svhn_cropped", "imagenette": "imagenette"}
# Never data, at any depth of a folder: hidden entries (.ipynb_checkpoints, .DS_Store, ._*) and:
OS_METADATA = {"__macosx", "thumbs.db", "desktop.ini", "@eadir", "#recycle", "$recycle.bin",
               "system volume information", "lost+found"}
# The official code's normalisation constants (mean, std per channel), by TFDS name; other
# datasets and folders are normalised with their own training statistics (`normalization`).
CIFAR_STATISTICS = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
IMAGENET_STATISTICS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
NORMALIZATION = {"cifar10": CIFAR_STATISTICS, "cifar100": CIFAR_STATISTICS,
                 "svhn_cropped": ([0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
                 "mnist": ([0.1307], [0.3081]), "fashion_mnist": ([0.2861], [0.3530]),
                 "imagenette": IMAGENET_STATISTICS}
TRAIN_SPLITS = ("train", "training")  # split folders, in any case, in order of preference
TEST_SPLITS = ("test", "testing", "val", "validation", "valid")


@dataclasses.dataclass
class Dataset:
    """An image-classification dataset in memory: uint8 images `[N, H, W, C]`, int32 labels,
    the training pixels' `mean`, `std` `[C]` in [0, 1] (networks normalise inside, so synthetic
    images stay in [0, 1]); `name` as given to `load_dataset` (folders as
    `folder:ABSOLUTE_PATH`); `data_dir` the absolute directory read (None: TFDS's default)."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    mean: np.ndarray
    std: np.ndarray
    data_dir: str = None
    num_classes = property(lambda self: len(self.class_names))
    image_shape = property(lambda self: tuple(self.x_train.shape[1:]))

    def class_counts(self):
        return np.bincount(self.y_train, minlength=self.num_classes)

    @functools.cached_property
    def digest(self):
        """The data's identity, whatever path, name or file order loaded it: SHA-256 (16 hex
        digits) of the class names, image shape and each split's sorted (image, label) digests;
        cached, so the arrays must not change."""
        h = hashlib.sha256(json.dumps([self.class_names, self.image_shape]).encode())
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            x, y = np.ascontiguousarray(x, np.uint8), np.asarray(y, np.int32)
            h.update(b"".join(sorted(hashlib.sha1(image).digest() + label.tobytes()
                                     for image, label in zip(x, y))) + b"|")
        return h.hexdigest()[:16]


def load_dataset(name, data_dir=None, image_size=32, test_fraction=0.2):
    """A `Dataset`: a TFDS image-classification `name` (`cifar10`, ...) from the TFDS
    `data_dir`; `mnist`, `fashion_mnist`, `kmnist` from the IDX files in `data_dir` if it holds
    them (offline); or `folder:PATH`, one sub-directory of images per class resized to
    `image_size` (see `_load_folder`). `name` is read as people write it (`Fashion-MNIST`,
    `CIFAR10`: see `dataset_name`); `Dataset.name` is the canonical spelling. Images keep their
    size (28x28 stays 28x28: the networks pad it, see `build_network`). `mean`, `std` are the
    official code's constants for the datasets of `NORMALIZATION`, else the training pixels'
    statistics. Raises NCFMError when the data cannot be found or read (naming the cause:
    permissions, ...)."""
    name = dataset_name(name)
    try:
        if name.startswith("folder:"):
            root = os.path.abspath(os.path.expanduser(name[len("folder:"):]))
            name, data_dir = "folder:" + root, None
            loaded = _load_folder(root, image_size, test_fraction)
        else:
            loaded = _load_idx(data_dir, name)  # None unless data_dir holds name's IDX files
            if loaded is None:
                loaded = _load_tfds(name, data_dir)
    except OSError as e:  # a folder or file we may not read (an image's own errors are warned)
        raise NCFMError(f"{e.filename} cannot be read "
                        f"{_unreadable(e, 'check that it is there and readable')}") from None
    x_train, y_train, x_test, y_test, class_names = loaded
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    mean, std = normalization(name, x_train)
    return Dataset(name, x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                   list(class_names), mean.astype(np.float32), std.astype(np.float32),
                   os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None)


def dataset_name(name):
    """`name` as this module spells it (`Dataset.name`, presets, pool keys, `NORMALIZATION`):
    the TFDS name of the spellings people write (`Fashion-MNIST`, `FashionMNIST`,
    `Fashion_MNIST` -> `fashion_mnist`; `CIFAR-10` -> `cifar10`; see `SPELLINGS`), else the
    name before any `/config` in lower case with `_` for `-` and spaces, as TFDS names are
    written; `folder:PATH` (any case of `folder:`) keeps its path as given."""
    if name[:len("folder:")].lower() == "folder:":
        return "folder:" + name[len("folder:"):]
    base, slash, config = name.partition("/")
    squeezed = "".join(c for c in base.lower() if c not in "-_ ")
    tfds_style = base.lower().replace("-", "_").replace(" ", "_")
    return SPELLINGS.get(squeezed, tfds_style) + slash + config


def normalization(name, x_train):
    """The per-channel `(mean, std)` `[C]` that networks normalise `name`'s images with: the
    official code's table (`NORMALIZATION`, by the name before any `/`; its
    `dataset_statistics`) where it lists the dataset and the images have its channels, else the
    statistics of the uint8 training images `x_train` `[N, H, W, C]` (a constant channel gets
    std 1)."""
    channels = x_train.shape[-1]
    known = NORMALIZATION.get(name.split("/")[0])
    if known is not None and len(known[0]) == channels:
        return np.float32(known[0]), np.float32(known[1])
    pixels = x_train.reshape(-1, channels).astype(np.float64) / 255.0
    std = pixels.std(axis=0)
    return pixels.mean(axis=0), np.where(std > 0, std, 1.0)


def _cause(error):
    """An exception's own first line, for messages: an OSError's `strerror` (`Permission
    denied`, without the path it repeats), else the first line of its text (else its type)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error) or type(error).__name__).splitlines()[0]


def _unreadable(error, fix):
    """`(cause); what to do` for a file or folder that could not be read: the exception's first
    line, then `fix` (re-create it, ...), or, when the system refused access, the permissions
    to check: deleting or re-creating a file one may not read does not help."""
    if isinstance(error, PermissionError):
        fix = "check its permissions and those of the folders above it"
    return f"({_cause(error)}); {fix}"


def _is_folder(path):
    """Whether `path` is a folder; False when it does not exist. Other errors (PermissionError
    on a folder above it) are raised, where `os.path.isdir` would say False."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _load_idx(data_dir, name):
    """`name`'s four MNIST-format IDX files (`.gz` or not) in `data_dir`; None when `name` is
    not of the MNIST family or `data_dir` holds none of them."""
    if name not in MNIST_FAMILY or not data_dir or not _is_folder(data_dir):
        return None
    present = set(os.listdir(data_dir))  # a folder we may not list raises PermissionError
    if not any(stem + ext in present for stem in IDX_FILES for ext in (".gz", "")):
        return None
    arrays = []
    for stem in IDX_FILES:
        names = [stem + ext for ext in (".gz", "") if stem + ext in present]
        if not names:
            raise NCFMError(f"{data_dir} has no {stem}[.gz]; pass the folder of the 4 IDX files")
        path = os.path.join(data_dir, names[0])
        arrays.append(_read_idx(path))
        if len(arrays) % 2 == 0 and len(arrays[-2]) != len(arrays[-1]):  # a split's labels
            raise NCFMError(f"{path} and its images differ in count; re-install the dataset files")
    return (*arrays, MNIST_FAMILY[name])


def _read_idx(path):
    """One IDX file: `00 00 08 ndim`, big-endian uint32 dimensions, then the uint8 values."""
    fix = "re-install the dataset files"
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # cut short, not gzip at all, or forbidden
        raise NCFMError(f"{path} cannot be read {_unreadable(e, fix)}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise NCFMError(f"{path} is not an uint8 IDX file; {fix}")
    dims = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * data[3])
    if values.size != math.prod(dims):
        raise NCFMError(f"{path} is truncated ({values.size}/{math.prod(dims)} values); {fix}")
    return values.reshape(dims)


def _load_tfds(name, data_dir):
    import requests
    import tensorflow_datasets as tfds
    if data_dir and not _is_folder(data_dir):
        what = "is a file" if os.path.exists(data_dir) else "does not exist"
        raise NCFMError(f"data_dir {data_dir} {what}; pass the folder that holds the data")
    ways = "an MNIST-family name with its IDX files in --data_dir, folder:PATH"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends; keep only the first line
        known = tfds.list_builders(with_community_datasets=False) + list(MNIST_FAMILY)
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.8)  # typos, not themes
        hint = f"did you mean {nearest[0]}? Else " if nearest else ""
        raise NCFMError(f"unknown dataset '{name}' ({_cause(e)}); {hint}use a TFDS name such "
                        f"as cifar10, {ways}") from None
    offline = f"offline, use {ways} or a --data_dir where `tfds build {name}` ran"
    # is_prepared() logs a warning for a folder without dataset_info.json: ask only after it.
    prepared = (tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
                and builder.is_prepared())
    if data_dir and not prepared:
        idx = " nor its IDX files" if name in MNIST_FAMILY else ""
        raise NCFMError(f"data_dir {data_dir} holds no prepared TFDS dataset '{name}'{idx}; "
                        f"{offline}")
    if not prepared:  # TFDS would retry an unreachable source for minutes: ask it once, 5 s
        urls = [u for u in builder.url_infos or {} if u.startswith(("http://", "https://"))]
        url = (urls or ["https://storage.googleapis.com/tfds-data/"])[0]
        try:
            requests.head(url, timeout=5, allow_redirects=False)
        except requests.RequestException as e:
            raise NCFMError(f"TFDS dataset '{name}' is not in {builder.data_dir} and its source "
                            f"{url.split('/')[2]} is unreachable ({type(e).__name__}); {offline}"
                            ) from None
    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if len(getattr(features[image_key], "shape", ())) != 3 or None in features[image_key].shape:
        raise NCFMError(f"{name} has images of varying sizes; export it to a folder: folder:PATH")
    try:
        builder.download_and_prepare()
        (x_train, y_train), (x_test, y_test) = (  # each split whole, as one batch
            tfds.as_numpy(builder.as_dataset(split=s, as_supervised=True, batch_size=-1))
            for s in ("train", "test"))
    except Exception as e:
        raise NCFMError(f"could not download or read TFDS dataset '{name}' (data_dir={data_dir}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}; {offline}") from None
    return x_train, y_train, x_test, y_test, features[label_key].names


def _visible(name):
    return not name.startswith(".") and name.lower() not in OS_METADATA


def _folder_classes(root):
    return sorted(d for d in os.listdir(root)
                  if _visible(d) and os.path.isdir(os.path.join(root, d)))


def _found(directory):
    """What `directory` holds, for error messages: `images/, wnids.txt and 3 more`."""
    names = []
    for name in os.listdir(directory):
        if not _visible(name):
            continue
        if os.path.isdir(os.path.join(directory, name)):
            name += "/"
        names.append(name)
    names.sort()
    if not names:
        return "nothing"
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def image_extensions():
    """The file extensions (lower case, with the dot) of every format this Pillow can open:
    `.png`, `.jpg`, `.webp`, `.tif`, `.bmp`, `.gif`, `.ppm`, ... (`Image.registered_extensions`
    less the formats Pillow only writes, such as `.pdf`)."""
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _raise(error):
    raise error


def _files(directory):
    """The paths of the files under `directory` at any depth (Tiny ImageNet:
    `<class>/images/`), sorted; hidden entries skipped, links followed (a link back up the tree
    is read once). A folder that cannot be listed raises its OSError (PermissionError), never
    skipped silently."""
    found, seen = [], set()
    for here, dirs, files in os.walk(directory, onerror=_raise, followlinks=True):
        if os.path.realpath(here) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(here))
        dirs[:] = [d for d in dirs if _visible(d)]
        found += [os.path.join(here, f) for f in files if _visible(f)]
    return sorted(found)


def _read_image(path, size):
    """One image file as uint8 `[size, size, 3]`, as a viewer shows it: the EXIF orientation
    applied (phone photos are stored sideways with a tag saying so), then Pillow's RGB, resized
    bilinearly. Raises whatever Pillow raises for a file it cannot read."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode.startswith("I"):  # 16-bit grayscale: the high byte (convert clips)
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        elif image.mode in ("P", "PA"):  # palette transparency goes through RGBA
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def _read_folder(root, class_names, size):
    """`root/<class>/**/<file>` as uint8 `[N, size, size, 3]` (`_read_image`) and int labels
    `[N]`, in class then path order: every file in a format Pillow reads (`image_extensions`).
    Files left out, unreadable or in no such format, are counted and named in one warning line,
    each unreadable one with its exception's first line. NCFMError when no image is read."""
    from PIL import Image

    extensions = image_extensions()
    files, others = [], []
    for label, name in enumerate(class_names):
        for path in _files(os.path.join(root, name)):
            if os.path.splitext(path)[1].lower() in extensions:
                files.append((path, label))
            else:
                others.append(os.path.relpath(path, root))
    if not files:
        first = class_names[0]
        raise NCFMError(f"folder {root} holds no images in a format Pillow reads (.png, .jpg, "
                        f".webp, .tif, ...) at any depth of its class sub-directories ({first}/ "
                        f"holds {_found(os.path.join(root, first))})")
    # Pillow refuses images over MAX_IMAGE_PIXELS (89 megapixels: a warning, an error over twice
    # that) to protect servers from decompression bombs in uploads. A training folder is the
    # user's own data, and a 180-megapixel scan is a valid image to resize like any other, so
    # the limit is lifted while the folder is read (memory holds one image at a time).
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    images, labels, unreadable = [], [], []
    try:
        for path, label in files:
            try:
                image = _read_image(path, size)
            except Exception as e:  # whatever Pillow raises, the file is not a readable image
                cause = _cause(e).replace(f" {path!r}", "")  # Pillow's repeats the path
                unreadable.append(f"{os.path.relpath(path, root)} ({cause})")
                continue
            images.append(image)
            labels.append(label)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if not images:
        raise NCFMError(f"none of the {len(files)} image files in {root} could be read (e.g. "
                        f"{unreadable[0]}); check that they are complete image files")
    left_out = unreadable + [f"{path} (not a format Pillow reads)" for path in others]
    if left_out:
        kinds = [f"{count} {kind}" for count, kind in ((len(unreadable), "unreadable"),
                                                      (len(others), "not images")) if count]
        more = ", ..." if len(left_out) > 3 else ""
        print(f"warning: left out {len(left_out)} of {len(files) + len(others)} files in {root} "
              f"({' and '.join(kinds)}): {', '.join(left_out[:3])}{more}", file=sys.stderr,
              flush=True)
    return np.stack(images), np.asarray(labels)


def _folder_splits(root, test_fraction):
    """`(train_dir, test_dir)` (None: hold out) of `root/<class>/`, or of `root/train/<class>/`
    (or `training/`) beside a TEST_SPLITS folder of the same classes (as ImageNet, CINIC-10
    ship)."""
    subdirs = {d.lower(): d for d in _folder_classes(root)}
    train = next((subdirs[s] for s in TRAIN_SPLITS if s in subdirs), None)
    classes = set(_folder_classes(os.path.join(root, train))) if train else set()
    extensions = image_extensions()
    if not classes or any(_visible(f) and os.path.splitext(f)[1].lower() in extensions
                          for f in os.listdir(os.path.join(root, train))):
        return root, None  # a class folder that happens to be called "train" holds images
    others = [d for k, d in subdirs.items() if k not in TRAIN_SPLITS + TEST_SPLITS]
    if others:
        raise NCFMError(f"folder {root} mixes {train}/ with other folders ({', '.join(others)}); "
                        f"expected <class>/ or {train}/<class>/ beside test/<class>/ (or val/)")
    tests = {subdirs[s]: set(_folder_classes(os.path.join(root, subdirs[s])))
             for s in TEST_SPLITS if s in subdirs}  # test-like split -> its class folders
    test = next((split for split, theirs in tests.items() if theirs == classes), None)
    if test is not None:
        return os.path.join(root, train), os.path.join(root, test)
    if not tests:
        return os.path.join(root, train), None
    found = []
    for split, theirs in tests.items():
        if not (theirs & classes and theirs <= classes):  # not a part of the class folders
            found.append(f"{split}/ holds {_found(os.path.join(root, split))}")
            continue
        missing = sorted(classes - theirs)
        more = " ..." if len(missing) > 3 else ""
        found.append(f"{split}/ lacks {', '.join(missing[:3])}{more}")
    raise NCFMError(f"folder {root}: expected {'/ or '.join(tests)}/ to hold the {len(classes)} "
                    f"class folders of {train}/, but {'; '.join(found)}; add them, or use folder:"
                    f"{os.path.join(root, train)} to hold out {test_fraction:.0%} of each class")


def _load_folder(root, image_size, test_fraction):
    """A folder dataset (see `_folder_splits`). A held-out test split is each class's last
    `test_fraction` of images in path order (at least one). Grayscale stays one channel."""
    is_folder = _is_folder(root)  # a folder above it we may not enter raises PermissionError
    if not is_folder and os.path.exists(root):
        raise NCFMError(f"folder:{root} is a file, not a folder; extract it (unzip, tar xf) and "
                        "pass the folder it holds")
    if not is_folder:
        raise NCFMError(f"folder {root} does not exist; pass folder:PATH, one sub-directory of "
                        "images per class")
    if image_size < 1:
        raise NCFMError(f"image size {image_size} is out of range: use 1 or more")
    train_dir, test_dir = _folder_splits(root, test_fraction)
    class_names = _folder_classes(train_dir)
    if len(class_names) < 2:
        inside = class_names and (f"; if the classes are inside {class_names[0]}/, pass folder:"
                                  f"{os.path.join(train_dir, class_names[0])}")
        raise NCFMError(f"folder {train_dir} has {len(class_names)} class sub-directories (it "
                        f"holds {_found(train_dir)}); classification needs at least two, one per "
                        f"class{inside or ''}")
    x_train, y_train = _read_folder(train_dir, class_names, image_size)
    if test_dir:
        x_test, y_test = _read_folder(test_dir, class_names, image_size)
    else:
        is_test = np.zeros(len(y_train), bool)
        for c, name in enumerate(class_names):
            idx = np.flatnonzero(y_train == c)  # path order
            if len(idx) < 2:
                raise NCFMError(f"class '{name}' in {train_dir} has {len(idx)} readable image(s); "
                                "each class needs at least two (one for training, one to test)")
            is_test[idx[-max(1, int(round(len(idx) * test_fraction))):]] = True
        x_train, y_train, x_test, y_test = (x_train[~is_test], y_train[~is_test],
                                            x_train[is_test], y_train[is_test])
    for split_labels, split in ((y_train, "train"), (y_test, "test")):
        missing = sorted(set(range(len(class_names))) - set(split_labels.tolist()))
        if missing:
            raise NCFMError(f"the {split} split of {root} has no images of class "
                            f"'{class_names[missing[0]]}'; add some")
    if all(np.array_equal(x[..., 0], x[..., i]) for x in (x_train, x_test) for i in (1, 2)):
        x_train, x_test = x_train[..., :1], x_test[..., :1]
    return x_train, y_train, x_test, y_test, class_names


def validation_split(data, size, seed=123):
    """`data` split to choose settings without the test set: its test split is `size` random
    training images, held out of its training split, so that nothing drawn, selected or
    trained on the returned training split (a baseline, herding's features) has seen them.
    `mean`, `std` stay the full training split's (a distilled set was made with them). A set
    distilled before from all the training images has seen them: it ranks settings, it reads a
    bit high. NCFMError unless every class keeps a training image."""
    if not 0 < size < len(data.x_train):
        raise NCFMError(f"validation size {size} is out of range: use 1.."
                        f"{len(data.x_train) - 1}")
    held_out = np.zeros(len(data.x_train), bool)
    held_out[np.random.default_rng(seed).choice(len(data.x_train), size, replace=False)] = True
    split = dataclasses.replace(data, x_train=data.x_train[~held_out],
                                y_train=data.y_train[~held_out], x_test=data.x_train[held_out],
                                y_test=data.y_train[held_out])
    emptied = np.flatnonzero(split.class_counts() == 0)
    if emptied.size:
        raise NCFMError(f"validation size {size} leaves class '{data.class_names[emptied[0]]}' "
                        "no training image; hold out fewer")
    return split


def to_float(images):
    """uint8 `[..., H, W, C]` -> float32 in [0, 1] (float input is passed through)."""
    floats = tf.cast(images, tf.float32)
    return floats / 255.0 if tf.as_dtype(images.dtype) == tf.uint8 else floats


def check_ipc(data, ipc):
    """Raises NCFMError unless every class holds at least `ipc` training images."""
    smallest = int(data.class_counts().min())
    if ipc <= 0 or ipc > smallest:
        raise NCFMError(f"ipc={ipc} is out of range: use 1..{smallest}, the smallest class's size")


def random_subset(data, ipc, seed=0):
    """The random-real baseline: `ipc` training images per class, drawn without replacement, as
    float32 `[K*ipc, H, W, C]` in [0, 1] and int32 labels `[K*ipc]`, class-sorted."""
    check_ipc(data, ipc)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.y_train == c), ipc, replace=False)
                          for c in range(data.num_classes)])
    return data.x_train[idx].astype(np.float32) / 255.0, data.y_train[idx]


def herding_subset(data, ipc, feature_fn, batch_size=500):
    """The herding baseline (Welling 2009), shaped as `random_subset`: per class, greedily the
    images keeping the running mean of `feature_fn(float images)` closest to the class mean."""
    check_ipc(data, ipc)
    chosen = []
    for c in range(data.num_classes):
        idx = np.flatnonzero(data.y_train == c)
        batches = (data.x_train[idx[i:i + batch_size]] for i in range(0, len(idx), batch_size))
        feats = np.concatenate([np.asarray(feature_fn(to_float(x))) for x in batches])
        target, running, picked = feats.mean(0), np.zeros_like(feats[0]), []
        for k in range(ipc):
            gaps = np.linalg.norm(target - (running * k + feats) / (k + 1), axis=1)
            gaps[picked] = np.inf
            picked.append(int(np.argmin(gaps)))
            running = (running * k + feats[picked[-1]]) / (k + 1)
        chosen.extend(idx[picked])
    return data.x_train[chosen].astype(np.float32) / 255.0, data.y_train[chosen]


def class_balanced_batches(data, batch_per_class, seed=0, start=0, order="shuffled"):
    """An endless `tf.data` stream of uint8 batches `[K, batch_per_class, H, W, C]`, every
    class in every batch, as NCFM's per-class matching needs. `order="shuffled"` (ours): each
    class is read in a random order redrawn on every pass over it; batch `i` is a pure function
    of `(seed, i)` (a stateless index shuffle), so a resumed run restarts the stream at its
    batch `start`. `order="first"`: every batch holds each class's first `batch_per_class`
    training images (in the data's order, cycled if the class is smaller), as the official
    loader's `class_sample` takes `[:n]` at every iteration. `NCFMError` for another `order`."""
    if order not in CHOICES["real_batch"]:
        raise NCFMError(f"order={order!r}: use shuffled or first")
    k, b = data.num_classes, batch_per_class
    images = tf.constant(data.x_train[np.argsort(data.y_train, kind="stable")])  # class-sorted
    counts = data.class_counts().astype(np.int64)
    slot_class = np.repeat(np.arange(k, dtype=np.int64), b)  # [K*b], a batch's slots flattened
    size, first = counts[slot_class], (np.cumsum(counts) - counts)[slot_class]
    seed_class = np.stack([np.full(k * b, seed, np.int64), slot_class], -1)  # [K*b, 2]
    slot = np.tile(np.arange(b, dtype=np.int64), k)  # a slot's place in its class's batch

    def batch(i):
        if order == "first":
            return tf.gather(images, np.reshape(slot % size + first, [k, b]))
        position = i * b + slot  # in its class's stream
        shuffled = tf.raw_ops.RandomIndexShuffle(  # one permutation per (seed, class, pass)
            index=position % size, seed=tf.concat([seed_class, (position // size)[:, None]], -1),
            max_index=size - 1)
        return tf.gather(images, tf.reshape(shuffled + first, [k, b]))

    return tf.data.Dataset.counter(start).map(batch, num_parallel_calls=tf.data.AUTOTUNE,
                                               deterministic=True).prefetch(2)


# --- Differentiable siamese augmentation (DSA, Zhao & Bilen 2021) ----------------------------
# Draw i of `dsa_parameters` transforms all of row i: in matching a class (its real and
# synthetic images alike), in evaluation an image. Every op has gradients and an XLA kernel
# (TF's ImageProjectiveTransformV3 has none, hence the hand-written `_bilinear_warp`).
RNG = "philox"  # stateless; XLA draws other numbers from a seed than TF's kernels do
DRAWS = 2  # raise when a step draws other random numbers from its seed (2: DSA_DRAWS by name)
DSA_SETTINGS = dict(scale=1.2, rotate_degrees=15.0, crop_ratio=0.125, cutout_ratio=0.5,
                    brightness=1.0, saturation=2.0, contrast=0.5)
GEOMETRIC = ("crop", "scale", "rotate")
# The draws of `dsa_parameters`, each from its own seed (the seed folded with its index).
DSA_DRAWS = ("flip", "brightness", "saturation", "contrast", "shift_y", "shift_x", "scale_x",
             "scale_y", "angle", "geometric", "cutout_y", "cutout_x")
DSA_OPS = ("color", "flip", "cutout") + GEOMETRIC


def split_seed(seed, n):
    """`n` independent int `[2]` seeds (a list) from the int `[2]` `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, n, alg=RNG))


def parse_augment(ops):
    """`"color_crop_cutout"` -> `("color", "crop", "cutout")`; `NCFMError` for an unknown
    op."""
    parsed = tuple(op for op in ops.split("_") if op)
    unknown = [op for op in parsed if op not in DSA_OPS]
    if unknown:
        raise NCFMError(f"unknown augmentation '{unknown[0]}' in '{ops}'; use '_'-joined names "
                        f"from {', '.join(DSA_OPS)}")
    return parsed


def dsa_parameters(seed, count, image_size, ops):
    """`count` draws (a dict of `[count, ...]` tensors) from the int `[2]` `seed` for `(H, W)`
    images; as the official code does, flip, colour and cutout apply whenever in `ops`, and a
    draw picks *one* of crop / scale / rotate."""
    ops, (height, width), s = parse_augment(ops), image_size, DSA_SETTINGS

    def uniform(name, low=0.0, high=1.0, dtype=tf.float32):
        """A `[count]` draw (int: `high` excluded) from the seed of its name in `DSA_DRAWS`:
        adding a draw leaves every other as it was."""
        draw_seed = tf.random.experimental.stateless_fold_in(seed, DSA_DRAWS.index(name),
                                                             alg=RNG)
        return tf.random.stateless_uniform([count], draw_seed, low, high, dtype, alg=RNG)

    params = {}
    if "flip" in ops:
        params["flip"] = tf.cast(uniform("flip") < 0.5, tf.float32)
    if "color" in ops:
        params["brightness"] = (uniform("brightness") - 0.5) * s["brightness"]
        params["saturation"] = uniform("saturation") * s["saturation"]
        params["contrast"] = uniform("contrast") + s["contrast"]
    geometric = [op for op in GEOMETRIC if op in ops]
    if geometric:  # crop by whole pixels, so that the warp is exact
        pad_y, pad_x = (int(n * s["crop_ratio"] + 0.5) for n in (height, width))
        shift_y = tf.cast(uniform("shift_y", -pad_y, pad_y + 1, tf.int32), tf.float32)
        shift_x = tf.cast(uniform("shift_x", -pad_x, pad_x + 1, tf.int32), tf.float32)
        lo, hi = 1.0 / s["scale"], s["scale"]
        scale_x = lo + (hi - lo) * uniform("scale_x")
        scale_y = lo + (hi - lo) * uniform("scale_y")
        angle = (uniform("angle") - 0.5) * 2.0 * s["rotate_degrees"] * math.pi / 180.0
        zero, one, cos, sin = tf.zeros([count]), tf.ones([count]), tf.cos(angle), tf.sin(angle)
        candidates = {  # the 2x3 matrices (row-major) mapping output to input coordinates
            "crop": [one, zero, 2.0 * shift_x / width, zero, one, 2.0 * shift_y / height],
            "scale": [scale_x, zero, zero, zero, scale_y, zero],
            "rotate": [cos, sin, zero, -sin, cos, zero]}
        matrices = [tf.stack(candidates[op], -1) for op in geometric]
        theta = tf.stack(matrices, 1)  # [count, n, 6]
        choice = uniform("geometric", 0, len(geometric), tf.int32)  # which of them
        params["theta"] = tf.gather(theta, choice, batch_dims=1)
    if "cutout" in ops:
        size_y, size_x = (int(n * s["cutout_ratio"] + 0.5) for n in (height, width))
        centre_y = uniform("cutout_y", 0, height + (1 - size_y % 2), tf.int32)
        centre_x = uniform("cutout_x", 0, width + (1 - size_x % 2), tf.int32)
        params["cutout_y"] = centre_y - size_y // 2
        params["cutout_x"] = centre_x - size_x // 2
    return params


def _bilinear_warp(images, theta):
    """Row i of `images` `[R, B, H, W, C]` warped by `theta[i]` (`[R, 6]`, output -> input in
    [-1, 1]) as torch's `affine_grid` + `grid_sample` (bilinear, zeros,
    align_corners=False)."""
    r, b, h, w, c = tf.unstack(tf.shape(images))
    height, width = images.shape[2], images.shape[3]
    ys, xs = ((2.0 * tf.range(n, dtype=tf.float32) + 1.0) / n - 1.0 for n in (height, width))
    grid_y, grid_x = (tf.reshape(g, [-1]) for g in tf.meshgrid(ys, xs, indexing="ij"))
    grid = tf.stack([grid_x, grid_y, tf.ones([height * width])], 0)  # [3, HW]
    source = tf.matmul(tf.reshape(theta, [-1, 2, 3]), grid)  # [R, 2, HW]
    src_x = ((source[:, 0] + 1.0) * width - 1.0) / 2.0  # pixel coordinates
    src_y = ((source[:, 1] + 1.0) * height - 1.0) / 2.0
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    flat = tf.transpose(tf.reshape(images, [r, b, h * w, c]), [0, 2, 1, 3])  # [R, HW, B, C]
    out = 0.0
    for dy, dx in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)):  # the 4 neighbours
        px, py = x0 + dx, y0 + dy
        inside = (px >= 0) & (px <= width - 1) & (py >= 0) & (py <= height - 1)
        weight = tf.where(inside, (1.0 - tf.abs(src_x - px)) * (1.0 - tf.abs(src_y - py)), 0.0)
        index = tf.cast(tf.clip_by_value(py, 0, height - 1) * width
                        + tf.clip_by_value(px, 0, width - 1), tf.int32)  # [R, HW]
        out += tf.gather(flat, index, batch_dims=1) * weight[:, :, None, None]
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [r, b, h, w, c])


def dsa_apply(images, params, mean=None, std=None):
    """Draw i of `params` applied to row i of `images`, `[R, B, H, W, C]` or `[R, H, W, C]`
    (one image per row), in [0, 1]. With the dataset's `mean`, `std` (`[C]`) it augments
    normalised images, as the official code does (mean-colour fill, jitter in std units), else
    the pixels (black fill). `NCFMError` if only one of `mean` and `std` is given."""
    if (mean is None) != (std is None):
        raise NCFMError("dsa_apply got only one of mean and std; pass both or neither")
    rows = images.shape.rank == 5
    x = images if rows else images[:, None]
    if mean is not None:
        mean, std = (tf.cast(tf.reshape(v, [-1]), x.dtype) for v in (mean, std))
        x = (x - mean) / std
    per_row = lambda v: tf.reshape(v, [-1, 1, 1, 1, 1])  # noqa: E731
    if "flip" in params:
        x = tf.where(per_row(params["flip"]) > 0.5, tf.reverse(x, [3]), x)
    if "brightness" in params:
        x = x + per_row(params["brightness"])
        gray = tf.reduce_mean(x, axis=4, keepdims=True)
        x = (x - gray) * per_row(params["saturation"]) + gray
        average = tf.reduce_mean(x, axis=[2, 3, 4], keepdims=True)
        x = (x - average) * per_row(params["contrast"]) + average
    if "theta" in params:
        x = _bilinear_warp(x, params["theta"])
    if "cutout_x" in params:
        size_y, size_x = (int(n * DSA_SETTINGS["cutout_ratio"] + 0.5) for n in x.shape[2:4])
        ys, xs = tf.range(x.shape[2])[None, :, None], tf.range(x.shape[3])[None, None, :]
        top, left = params["cutout_y"][:, None, None], params["cutout_x"][:, None, None]
        hole = (ys >= top) & (ys < top + size_y) & (xs >= left) & (xs < left + size_x)
        x = x * tf.cast(~hole, x.dtype)[:, None, :, :, None]
    if mean is not None:
        x = x * std + mean
    return x if rows else x[:, 0]


def augment(images, seed, ops, mean=None, std=None):
    """Per-sample DSA of `[N, H, W, C]` images (as evaluation trains); see `dsa_apply`."""
    params = dsa_parameters(seed, tf.shape(images)[0], images.shape[1:3], ops)
    return dsa_apply(images, params, mean, std)


def cutmix(images, labels, seed):
    """CutMix (Yun et al. 2019, beta 1): pastes a random box from a shuffled copy of the batch
    `[N, H, W, C]` and mixes the labels `[N, K]` (probabilities) by the pasted area, as the
    official `rand_bbox`: lam ~ Beta(1, 1), i.e. U(0, 1), the box side sqrt(1 - lam) of the
    image's, centred on a uniform pixel and clipped at the border."""
    n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    lam_seed, y_seed, x_seed, order_seed = split_seed(seed, 4)
    cut = tf.sqrt(1.0 - tf.random.stateless_uniform([], lam_seed, alg=RNG))
    cy = tf.random.stateless_uniform([], y_seed, 0, height, tf.int32, alg=RNG)  # the centre
    cx = tf.random.stateless_uniform([], x_seed, 0, width, tf.int32, alg=RNG)
    half_h, half_w = (tf.cast(cut * side / 2, tf.int32) for side in (height, width))
    y0, y1 = tf.maximum(cy - half_h, 0), tf.minimum(cy + half_h, height)
    x0, x1 = tf.maximum(cx - half_w, 0), tf.minimum(cx + half_w, width)
    rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
    box = tf.cast((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1), images.dtype)
    box = box[None, :, :, None]
    # A uniform random permutation as the order of n uniform keys (XLA has no shuffle op).
    perm = tf.argsort(tf.random.stateless_uniform([n], order_seed, alg=RNG))
    mixed = images * (1.0 - box) + tf.gather(images, perm) * box
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / float(height * width)
    return mixed, labels * (1.0 - area) + tf.gather(labels, perm) * area


# --- Networks --------------------------------------------------------------------------------
ARCHITECTURES = ("convnet", "alexnet", "vgg11", "resnet18")
MNIST_SIZE, MNIST_PAD = (28, 28), 2  # 28x28 inputs are padded to 32x32 inside the networks


def convnet_depth(image_size):
    """ConvNet-D depth for a square input: 3 for 32x32, 4 for 64x64, 5 for 128x128."""
    return max(1, int(round(math.log2(image_size / 4))))


def _torch_init(fan_in, seeds):
    """Fresh initialisers as torch's default Conv2d / Linear ones (the official code's, which
    set the scale of NCFM's theta_init): kernel and bias U(±1/√fan_in), drawn from the
    network's `keras.random.SeedGenerator` `seeds`."""
    bound = 1.0 / math.sqrt(fan_in)
    kernel = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=seeds)
    return dict(kernel_initializer=kernel,
                bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seeds))


def _conv(x, filters, kernel, seeds, strides=1, use_bias=True, activation=None):
    return layers.Conv2D(filters, kernel, strides, padding="same", activation=activation,
                         use_bias=use_bias,
                         **_torch_init(kernel * kernel * x.shape[-1], seeds))(x)


def _conv_norm(x, filters, seeds, kernel=3, strides=1, use_bias=True, relu=True):
    """conv -> instance norm (gamma 1, beta 0, as torch's GroupNorm) [-> ReLU]."""
    x = layers.GroupNormalization(groups=-1, epsilon=1e-5)(
        _conv(x, filters, kernel, seeds, strides=strides, use_bias=use_bias))
    return layers.ReLU()(x) if relu else x


def build_network(arch, image_shape, num_classes, mean, std, seed=0):
    """A `keras.Model`: `[N, H, W, C]` images in [0, 1], normalised by `mean`, `std` (`[C]`),
    to logits; its layer "features" is the flattened penultimate activation (2048-d for
    ConvNet-3 on 32x32 and on 28x28). `arch`: `convnet` (D x [conv3x3(128), instance norm,
    ReLU, avg-pool 2]), `alexnet`, `vgg11` or `resnet18` (Zhao et al.'s CIFAR variants, with
    instance norm); else `NCFMError`. 28x28 images (the MNIST family) are padded by 2 after
    normalisation, so with the mean colour, and the rest of the network sees CIFAR's 32x32
    shapes: DC's and the official code's first convolution pads by 3 (AlexNet's by 4) for them;
    ResNet-18 takes 28x28 as is. The initial weights are a function of the int `seed` alone."""
    if arch not in ARCHITECTURES:
        raise NCFMError(f"unknown architecture '{arch}'; use one of "
                        f"{', '.join(ARCHITECTURES)}")
    seeds = keras.random.SeedGenerator(seed)
    inputs = keras.Input(image_shape)
    x = layers.Normalization(mean=list(mean), variance=list(np.square(std)))(inputs)
    if tuple(image_shape[:2]) == MNIST_SIZE and arch != "resnet18":
        x = layers.ZeroPadding2D(MNIST_PAD)(x)  # the first convolution's extra padding
    if arch == "convnet":
        for _ in range(convnet_depth(x.shape[1])):
            x = layers.AveragePooling2D(2)(_conv_norm(x, 128, seeds))
    elif arch == "alexnet":
        for spec in ((128, 5), "M", (192, 5), "M", (256, 3), (192, 3), (192, 3), "M"):
            if spec == "M":
                x = layers.MaxPooling2D(2)(x)
            else:
                filters, kernel = spec
                x = _conv(x, filters, kernel, seeds, activation="relu")
    elif arch == "vgg11":
        for filters in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            x = layers.MaxPooling2D(2)(x) if filters == "M" else _conv_norm(x, filters, seeds)
    else:
        x = _conv_norm(x, 64, seeds, use_bias=False)
        for filters, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                                (512, 2), (512, 1)):
            y = _conv_norm(x, filters, seeds, strides=stride, use_bias=False)
            y = _conv_norm(y, filters, seeds, use_bias=False, relu=False)
            if stride != 1 or x.shape[-1] != filters:  # project the shortcut
                x = _conv_norm(x, filters, seeds, kernel=1, strides=stride, use_bias=False,
                               relu=False)
            x = layers.ReLU()(layers.Add()([y, x]))
        x = layers.GlobalAveragePooling2D()(x)
    features = layers.Flatten(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32",
                          **_torch_init(features.shape[-1], seeds))(features)
    return keras.Model(inputs, logits, name=arch)


def _fits(arch, image_shape):
    """Whether `arch` can be built for `image_shape` (its pooling leaves at least one
    pixel)."""
    try:
        build_network(arch, image_shape, 2, [0.0] * image_shape[-1], [1.0] * image_shape[-1])
        return True
    except NCFMError:  # an unknown architecture
        raise
    except ValueError:  # Keras: "Computed output size would be zero or negative"
        return False


def smallest_image_size(arch, channels=3):
    """The smallest side S (a power of two) of `[S, S, channels]` images that `arch` takes."""
    sizes = (2 ** i for i in range(16))
    return next(size for size in sizes if _fits(arch, (size, size, channels)))


def check_architectures(archs, image_shape):
    """`NCFMError` naming each of `archs` that cannot take `(H, W, C)` images, and its
    minimum."""
    too_small = [(arch, smallest_image_size(arch, image_shape[-1])) for arch in archs
                 if not _fits(arch, tuple(image_shape))]
    if too_small:
        needs = ", ".join(f"{arch} needs at least {s}x{s}" for arch, s in too_small)
        raise NCFMError(f"images of {image_shape[0]}x{image_shape[1]} are too small: {needs}; "
                        "drop those architectures or use larger images")


def with_features(model):
    """The same network (shared weights) returning `(features, logits)`."""
    return keras.Model(model.input, [model.get_layer("features").output, model.output])


def features_of(model):
    """A function from float images `[N, H, W, C]` in [0, 1] to `model`'s features `[N, D]`
    (inference mode), as herding selects on."""
    features = keras.Model(model.input, model.get_layer("features").output)
    return lambda images: features(images, training=False)


# --- Training a network: the protocols of evaluation and of the pool's pretraining -----------

class CoupledSGD(keras.optimizers.SGD):
    """SGD with the weight decay `wd` (`coupled_weight_decay`) inside the momentum, as in
    `torch.optim.SGD`, the official code's optimizer:

        v <- momentum·v + g + wd·w;  w <- w - lr·v

    Keras' velocity holds the learning rate: after a drop the momentum fades at the old rate,
    about 1/(1 - momentum) times weaker than torch's for a while."""

    def __init__(self, learning_rate=0.01, momentum=0.0, coupled_weight_decay=0.0, **kwargs):
        super().__init__(learning_rate, momentum=momentum, **kwargs)
        self.coupled_weight_decay = coupled_weight_decay

    def update_step(self, gradient, variable, learning_rate):
        if self.coupled_weight_decay:
            gradient = gradient + self.coupled_weight_decay * variable
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


def _evaluation_optimizer(protocol, steps):
    """AdamW (decoupled weight decay, as torch's) or `CoupledSGD` (momentum 0.9), stepped."""
    boundaries = [max(1, int(f * steps)) for f in protocol.lr_milestones]
    boundaries = sorted(set(min(b, max(steps - 1, 1)) for b in boundaries))
    values = [protocol.learning_rate * protocol.lr_factor ** i
              for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    if protocol.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=protocol.weight_decay)
    return CoupledSGD(schedule, momentum=0.9, coupled_weight_decay=protocol.weight_decay)


def training_batches(x, targets, batch_size, seed, epochs):
    """Batches `(images, targets)` of `x` as stored (uint8 or float) and of `targets`, epoch e
    in the order of the e-th permutation of `np.random.default_rng(seed)` (so, unlike a
    `tf.data` shuffle, whatever TensorFlow's global seed), the last batch of an epoch short;
    `epochs` of them, then endlessly again (fit() keeps one iterator). Only ordering and
    batching, on the host: the augmentation runs in the training step (`NetworkTrainer`)."""
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(len(x)) for _ in range(epochs)])
    images = tf.constant(x)
    labels = tf.constant(targets)

    def epoch(order):
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def gathered(indices):
        return tf.gather(images, indices), tf.gather(labels, indices)

    return (tf.data.Dataset.from_tensor_slices(orders).flat_map(epoch).map(gathered)
            .repeat().prefetch(tf.data.AUTOTUNE))


class NetworkTrainer(keras.Model):
    """Trains `network` (whose `call` it is) on `training_batches` as `protocol` says, with the
    augmentation inside the compiled step, as the official code augments on the GPU:
    per-sample DSA (in `protocol.dsa_space`; `mean`, `std` `[C]` are the dataset's) and CutMix
    with probability `protocol.cutmix_prob`. Step s draws from the stateless seed
    `fold_in([seed, 0], s)`: with `training_batches`' order, a run is a function of `seed`
    and of the device (XLA, on a GPU, draws other numbers from a seed than TF's kernels).

    With `soft_steps`, the targets `[N, 2K]` hold the one-hot label, then the soft one (CutMix
    mixes both, as the official code mixes its two losses), and the first `soft_steps` steps
    train on the soft half, the rest on the hard one; a frozen `teacher`'s softmax (T = 1) on
    the augmented, mixed batch is then the soft half ("per-batch" labels, as SRe2L and RDED
    use)."""

    def __init__(self, network, protocol, seed, mean=None, std=None, teacher=None,
                 soft_steps=None):
        super().__init__()
        self.network = network
        self.teacher = teacher
        self.soft_steps = soft_steps
        self.augment_ops = protocol.augment
        self.cutmix_prob = protocol.cutmix_prob
        pixel = protocol.dsa_space == "pixel"
        self.mean = None if pixel else mean
        self.std = None if pixel else std
        self.seed = tf.constant([seed, 0], tf.int64)
        if teacher is not None:
            teacher.trainable = False
        # Its own count: a loss-scaled optimizer's `iterations` skips overflowing steps.
        self.batches_seen = self.add_weight(shape=(), initializer="zeros", dtype="int64",
                                            trainable=False, name="batches_seen",
                                            aggregation="only_first_replica")

    def call(self, images, training=False):
        return self.network(images, training=training)

    def train_step(self, data):
        images, targets = data
        step_seed = tf.random.experimental.stateless_fold_in(self.seed, self.batches_seen,
                                                             alg=RNG)
        images, targets = self.augmented(to_float(images), targets, step_seed)
        labels = targets
        if self.soft_steps is not None:
            labels = self.labels(images, targets)
        self.batches_seen.assign_add(1)
        return super().train_step((images, labels))

    def augmented(self, images, targets, seed):
        """DSA, then CutMix on a `cutmix_prob` share of the batches."""
        dsa_seed, cutmix_seed, coin_seed = split_seed(seed, 3)
        images = augment(images, dsa_seed, self.augment_ops, self.mean, self.std)
        if self.cutmix_prob == 0:
            return images, targets
        mixed, mixed_targets = cutmix(images, targets, cutmix_seed)
        use = tf.random.stateless_uniform([], coin_seed, alg=RNG) < self.cutmix_prob
        return tf.where(use, mixed, images), tf.where(use, mixed_targets, targets)

    def labels(self, images, targets):
        """The soft half of `targets` (or the teacher's softmax) for the first `soft_steps`
        steps, then the hard half."""
        k = targets.shape[-1] // 2

        def soft():
            if self.teacher is None:
                return targets[:, k:]
            return tf.nn.softmax(tf.cast(self.teacher(images, training=False), tf.float32))

        def hard():
            return targets[:, :k]

        return tf.cond(self.batches_seen < self.soft_steps, soft, hard)


def train_network(model, x, y, num_classes, protocol, seed=0, callbacks=(), verbose=0,
                  mean=None, std=None, soft=None, teacher=None, hard_label_epochs=0,
                  test_data=None, test_epochs=()):
    """Trains and returns `model` on images `x` (uint8, or float in [0, 1]) and labels `y` (int
    `[N]`, or soft `[N, K]`) as `protocol` says, with `NetworkTrainer`; `mean`, `std`: the
    dataset's `[C]` statistics, needed for normalised DSA (else `NCFMError`). `soft`
    (`[N, K]`) or a `teacher` give the targets but in the last `hard_label_epochs` epochs.
    `test_data` (batches of images, one-hot labels) is tested after the 1-based
    `test_epochs`, into `callbacks`' History. XLA as Keras' "auto": on a GPU."""
    if protocol.epochs <= 0:
        raise NCFMError(f"epochs={protocol.epochs}: training needs at least one epoch")
    if protocol.dsa_space == "normalized" and (mean is None or std is None):
        raise NCFMError("normalised DSA needs the dataset's mean and std; pass mean= and std=")
    y = np.asarray(y)
    targets = keras.utils.to_categorical(y, num_classes) if y.ndim == 1 else y
    x = np.asarray(x) if np.asarray(x).dtype == np.uint8 else np.asarray(x, np.float32)
    steps_per_epoch = math.ceil(len(x) / protocol.batch_size)
    steps = protocol.epochs * steps_per_epoch
    soft_steps = None
    if soft is not None or teacher is not None:
        soft_steps = steps - hard_label_epochs * steps_per_epoch
        targets = np.concatenate([targets, targets if soft is None else soft], 1)
    trainer = NetworkTrainer(model, protocol, seed, mean=mean, std=std, teacher=teacher,
                             soft_steps=soft_steps)
    trainer.compile(optimizer=_evaluation_optimizer(protocol, steps), metrics=["accuracy"],
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    batches = training_batches(x, targets.astype(np.float32), protocol.batch_size, seed,
                               protocol.epochs)
    trainer.fit(batches, epochs=protocol.epochs, steps_per_epoch=steps_per_epoch,
                callbacks=list(callbacks), verbose=verbose, shuffle=False,
                validation_data=test_data, validation_freq=list(test_epochs))
    return model


# --- The method, from here to `NCFM`. First, the pretrained pool -----------------------------
# NCFM extracts features with ConvNets blended between their initial and trained weights,
# theta = lam * theta_init + (1 - lam) * theta_trained, a fresh member and lam every step. The
# pool is expensive and reusable, so every member is cached on disk as soon as it is trained.

POOL_RECIPE = 4  # raise when the pretraining, the networks or the normalisation change: old
#                 caches go unused (3: 28x28 kept, padded in the network; official constants;
#                 4: augmentation in the step, seeded initial weights and batch order)


def pool_key(data, arch, epochs, seed):
    """A cache key: the dataset's name and digest, the architecture, settings and recipe."""
    fields = {"strategy" if k == "augment" else k: v  # the old name keeps the cached keys
              for k, v in dataclasses.asdict(PROTOCOLS["pretrain"]).items()}
    recipe = hashlib.sha1(json.dumps([POOL_RECIPE, fields]).encode()).hexdigest()[:6]
    name = "".join(c if c.isalnum() else "_" for c in data.name.split("/")[-1])[:40]
    return f"{name}-{data.digest}-{arch}-e{epochs}-s{seed}-r{recipe}"


def read_pool_member(path):
    """A cached member's `(initial, trained)` weight lists. Raises FileNotFoundError when it is
    absent, `NCFMError` naming the cause when it cannot be read (cut short, permissions)."""
    try:
        with np.load(path) as f:
            count = len(f.files) // 2
            return [f[f"init_{i}"] for i in range(count)], [f[f"trained_{i}"] for i in range(count)]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fix = "delete it and re-run train.py to train it again"
        raise NCFMError(f"pool member {path} cannot be read {_unreadable(e, fix)}") from None


def pool_member_seed(seed, member):
    """The int seed (31 bits) of pool `member`'s initial weights and training, hashed from
    `(POOL_RECIPE, seed, member)`: not one of the small seeds of an evaluation's networks
    (`evaluate_images`' `seed`), which would start from the very weights the images were
    matched with."""
    return int(np.random.SeedSequence([POOL_RECIPE, seed, member]).generate_state(1)[0] >> 1)


def pool_members(data, num_models, epochs, cache_dir, arch="convnet", seed=0):
    """The cache files of a pool's members, `[num_models]` paths (present or not)."""
    key = pool_key(data, arch, epochs, seed)
    return [os.path.join(cache_dir, key, f"member-{member:03d}.npz")
            for member in range(num_models)]


def pretrain_pool(data, num_models, epochs, cache_dir, arch="convnet", seed=0, verbose=1,
                  callbacks=()):
    """Trains (or loads from `cache_dir`) `num_models` networks on the real data, each from its
    own initialisation with the "pretrain" protocol for `epochs` epochs, caching each as it
    finishes (an interrupted pool resumes); `callbacks` see every member's training. Returns
    `(initial, trained)`: per member, the numpy weights in the order of
    `with_features(build_network(...)).weights`."""
    if num_models < 1 or epochs < 0:
        raise NCFMError(f"a pool needs num_models >= 1 and epochs >= 0, not {num_models}, "
                        f"{epochs}")
    protocol = dataclasses.replace(PROTOCOLS["pretrain"], epochs=epochs)
    bar = keras.utils.Progbar(num_models * epochs, verbose=verbose) if epochs else None
    members = []
    paths = pool_members(data, num_models, epochs, cache_dir, arch, seed)
    for member, path in enumerate(paths):
        if not os.path.exists(path):
            member_seed = pool_member_seed(seed, member)
            model = build_network(arch, data.image_shape, data.num_classes, data.mean,
                                  data.std, seed=member_seed)
            start = [w.numpy() for w in model.weights]
            if epochs:
                progress = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: bar.update(
                    member * epochs + e + 1, [("accuracy", logs.get("accuracy", 0.0))]))
                train_network(model, data.x_train, data.y_train, data.num_classes, protocol,
                              seed=member_seed, callbacks=[progress, *callbacks],
                              mean=data.mean, std=data.std)
            save_npz(path, **{f"init_{i}": w for i, w in enumerate(start)},
                     **{f"trained_{i}": w.numpy() for i, w in enumerate(model.weights)})
        elif bar is not None:
            bar.update((member + 1) * epochs)
        members.append(read_pool_member(path))
    return [initial for initial, _ in members], [trained for _, trained in members]


# --- The synthetic set: multi-formation (IDC, Kim et al. 2022) and initialisation ------------

def decode(images, factor):
    """Multi-formation decoding: every stored image holds a factor x factor mosaic whose cells
    are resized (bilinear) back to full size. `[N, H, W, C]` -> `[N*factor^2, H, W, C]`, cells
    in row-major order. Differentiable, XLA-friendly."""
    if factor == 1:
        return images
    n, height, width, channels = (tf.shape(images)[0],) + tuple(images.shape[1:])
    cell_height, cell_width = height // factor, width // factor
    cells = tf.reshape(images, [n, factor, cell_height, factor, cell_width, channels])
    cells = tf.reshape(tf.transpose(cells, [0, 1, 3, 2, 4, 5]),
                       [-1, height // factor, width // factor, channels])
    return tf.image.resize(cells, [height, width], method="bilinear")


def decode_labels(labels, factor):
    """The labels of `decode(images, factor)`."""
    return np.repeat(np.asarray(labels), factor * factor, axis=0)


def first_subset(data, ipc):
    """Each class's first `ipc` training images (in the data's order), shaped as
    `random_subset`: the official code's selection (its loader's `class_sample` takes
    `[:n]`)."""
    check_ipc(data, ipc)
    idx = np.concatenate([np.flatnonzero(data.y_train == c)[:ipc]
                          for c in range(data.num_classes)])
    return data.x_train[idx].astype(np.float32) / 255.0, data.y_train[idx]


def nearest_resize(images, height, width):
    """`[N, H, W, C]` images resized to `height x width` as torch's `F.interpolate` default
    (legacy nearest-neighbour: output pixel j reads input pixel floor(j * H / height))."""
    rows = np.arange(height) * images.shape[1] // height
    cols = np.arange(width) * images.shape[2] // width
    return images[:, rows][:, :, cols]


def initial_images(data, ipc, factor, init="mix", seed=0, init_from="first", resize="nearest",
                   feature_fn=None):
    """Initial stored images `[K*ipc, H, W, C]` in [0, 1], class-sorted. `real` copies real
    images; `mix` fills the factor x factor cells of each stored image with real images of its
    class, downsampled (`resize`: "nearest", as the official code's `F.interpolate`, or
    "area"): cell k (row-major) of the class's i-th stored image holds its (k * ipc + i)-th
    chosen image, as the official `mix` init lays them out; `noise` is N(0.5, 0.25^2), clamped.
    The real images are each class's first ones (`init_from="first"`, the official selection),
    a random draw (`"random"`, from `seed`) or herding's choice in order (`"herding"`, ours:
    `herding_subset` on `feature_fn`, e.g. `pool_feature_fn`). NCFMError for an unknown
    setting, herding without `feature_fn`, a `factor` not dividing the image size, or classes
    too small for the images."""
    for name, value in (("init", init), ("init_from", init_from), ("init_resize", resize)):
        if value not in CHOICES[name]:
            raise NCFMError(f"unknown {name} '{value}'; use {' or '.join(CHOICES[name])}")
    if init_from == "herding" and feature_fn is None:
        raise NCFMError("init_from='herding' needs the features it selects on: pass feature_fn")
    height, width, channels = data.image_shape
    if factor < 1 or height % factor or width % factor:
        raise NCFMError(f"factor={factor} must be >= 1 and divide the image size "
                        f"{height}x{width}")
    if init == "noise":
        shape = (data.num_classes * ipc, height, width, channels)
        return np.clip(np.random.default_rng(seed).normal(0.5, 0.25, shape), 0, 1).astype(
            np.float32)
    cells = ipc * factor * factor if init == "mix" else ipc
    if init_from == "first":
        x, _ = first_subset(data, cells)  # [K*cells, H, W, C]
    elif init_from == "random":
        x, _ = random_subset(data, cells, seed)
    else:
        x, _ = herding_subset(data, cells, feature_fn)
    if init == "real":
        return x
    cell_height, cell_width = height // factor, width // factor
    if resize == "nearest":
        small = nearest_resize(x, cell_height, cell_width)
    else:
        small = tf.image.resize(x, [cell_height, cell_width], method="area").numpy()
    # [K, factor (row), factor (column), ipc, h, w, C] -> [K, ipc, factor, h, factor, w, C]
    cells = small.reshape(data.num_classes, factor, factor, ipc, cell_height, cell_width,
                          channels)
    mosaic = cells.transpose(0, 3, 1, 4, 2, 5, 6).reshape(-1, height, width, channels)
    return np.clip(mosaic, 0, 1).astype(np.float32)


# --- The CF discrepancy (Eq. 6-8) and the sampling network psi (Sec. 4.2.2) ------------------

def empirical_cf(features, t):
    """Real and imaginary parts `[..., M]` of the empirical CF, mean_i exp(j <t_m, x_i>) (Eq.
    6), of features `[..., B, D]` at frequencies `t`: `[M, D]` shared by every leading entry,
    or `[g, M, D]`, one set per entry of `[g, B, D]` features."""
    if t.shape.rank == 3:
        projection = tf.matmul(features, t, transpose_b=True)  # [g, B, M]
    else:  # one [N, D] x [D, M] product: a batched one would make t's gradient [..., M, D]
        flat = tf.reshape(features, [-1, features.shape[-1]])
        projection = tf.reshape(tf.matmul(flat, t, transpose_b=True),
                                tf.concat([tf.shape(features)[:-1], tf.shape(t)[:1]], 0))
    return tf.reduce_mean(tf.cos(projection), -2), tf.reduce_mean(tf.sin(projection), -2)


def cf_loss(feat_real, feat_syn, t, alpha=0.5, beta=0.5):
    """NCFM's CF discrepancy (Eq. 7-8) `[...]` of features `[..., B1, D]` and `[..., B2, D]` at
    frequencies `t` (as `empirical_cf` takes them), in float32 whatever the dtype policy,
    linear in the batch sizes and the number of frequencies (no B1 x B2 kernel):

        amplitude_m = (|Phi_a| - |Phi_b|)^2                         # Eq. 7, amplitude
        phase_m = 2 (|Phi_a||Phi_b| - re_a re_b - im_a im_b)        # Eq. 7, phase (>= 1e-12)
        loss = mean_m sqrt(alpha amplitude_m + beta phase_m)        # Eq. 8
    """
    a, b, t = (tf.cast(v, tf.float32) for v in (feat_real, feat_syn, t))
    (re_a, im_a), (re_b, im_b) = empirical_cf(a, t), empirical_cf(b, t)
    norm_a, norm_b = tf.sqrt(re_a * re_a + im_a * im_a), tf.sqrt(re_b * re_b + im_b * im_b)
    amplitude = tf.square(norm_a - norm_b)
    phase = tf.maximum(2.0 * (norm_a * norm_b - re_a * re_b - im_a * im_b), 1e-12)
    return tf.reduce_mean(tf.sqrt(alpha * amplitude + beta * phase), -1)


def mmd_loss(feat_real, feat_syn):
    """DM's discrepancy (Zhao & Bilen 2023), the baseline: the squared distance of the mean
    features, i.e. MMD with a linear kernel. Shape `[...]`."""
    a, b = tf.cast(feat_real, tf.float32), tf.cast(feat_syn, tf.float32)
    return tf.reduce_sum(tf.square(tf.reduce_mean(a, -2) - tf.reduce_mean(b, -2)), -1)


class SamplingNet(keras.Model):
    """psi (Sec. 4.2.2): the frequency law as a scale mixture of normals,
    p(t) = int N(t | 0, S) p_psi(S) dS. An MLP (3 x Dense(D), BatchNorm + LeakyReLU(0.2)
    between) maps `num_freqs / per_component` Gaussian noise vectors to scales `s_k` `[D]`;
    each component emits `per_component` frequencies `t = s_k * eps`, eps ~ N(0, I),
    reparameterised so that gradients reach psi. The scales are `max_scale * sigmoid(.)`,
    starting at 1 (t ~ N(0, I)). The bound is ours (the official code bounds t with a tanh):
    unbounded scales let the ascent widen t until the CF of a few synthetic images is noise.
    Its initial weights are a function of the int `seed` alone. Raises NCFMError unless
    `per_component` divides `num_freqs` and `max_scale` > 1."""

    def __init__(self, feature_dim, num_freqs, per_component=16, max_scale=2.0, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        if num_freqs % per_component:
            raise NCFMError(f"num_freqs={num_freqs} must be a multiple of {per_component}")
        if max_scale <= 1:
            raise NCFMError(f"max_scale={max_scale} must be > 1 (psi starts at scale 1)")
        self.max_scale, self.feature_dim, self.num_freqs = max_scale, feature_dim, num_freqs
        self.components, self.per_component = num_freqs // per_component, per_component
        # sigmoid(start) = 1 / max_scale: the scales start at 1
        start = keras.initializers.Constant(-math.log(max_scale - 1))
        seeds = keras.random.SeedGenerator(seed)
        self.mlp = keras.Sequential(
            [layers.Dense(feature_dim, use_bias=False,  # BatchNorm supplies the shift
                          kernel_initializer=keras.initializers.GlorotUniform(seeds)),
             layers.BatchNormalization(), layers.LeakyReLU(0.2),
             layers.Dense(feature_dim, use_bias=False,
                          kernel_initializer=keras.initializers.GlorotUniform(seeds)),
             layers.BatchNormalization(), layers.LeakyReLU(0.2),
             layers.Dense(feature_dim, activation="sigmoid", dtype="float32",
                          kernel_initializer=keras.initializers.GlorotUniform(seeds),
                          bias_initializer=start)])
        self.mlp.build((None, feature_dim))

    def call(self, seed, training=False):
        """Draws `[num_freqs, D]` frequencies from the int seed `[2]`."""
        noise_seed, eps_seed = split_seed(seed, 2)
        noise = tf.random.stateless_normal([self.components, self.feature_dim], noise_seed,
                                           alg=RNG)
        scales = self.max_scale * tf.cast(self.mlp(noise, training=training), tf.float32)
        eps = tf.random.stateless_normal([self.components, self.per_component, self.feature_dim],
                                         eps_seed, alg=RNG)
        return tf.reshape(scales[:, None, :] * eps, [self.num_freqs, self.feature_dim])


# --- Several devices and non-finite steps: what `NCFM` needs of them -------------------------
# On one device `replica_classes` is all K classes, `for_each_class` a `tf.while_loop`,
# `sum_over_replicas` the identity and `apply_if_finite` an `optimizer.apply` that skips a
# non-finite update.

def classes_per_replica(num_classes, replicas=None):
    """K/R, the classes each of R replicas (default: the strategy's) matches; NCFMError unless
    R divides K."""
    if replicas is None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if num_classes % replicas:
        raise NCFMError(f"{replicas} devices cannot share {num_classes} classes evenly; make "
                        "the number of visible devices divide it (e.g. CUDA_VISIBLE_DEVICES)")
    return num_classes // replicas


def replica_classes(count):
    """The `count` classes (int32 `[count]`) this replica matches: all K without a strategy."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.cast(replica, tf.int32) * count + tf.range(count)


def for_each_class(count, step, state):
    """`state = step(j, state)` for the classes j = 0 .. count-1 in turn: a `tf.while_loop`,
    whose graph does not grow with the count, or unrolled under a strategy (replicas cannot
    synchronise inside a `tf.while_loop`)."""
    if tf.distribute.has_strategy():
        for j in range(count):
            state = step(j, state)
        return state

    def body(j, state):
        return j + 1, step(j, state)

    def more(j, state):
        return j < count

    return tf.while_loop(more, body, (0, state))[1]


def sum_over_replicas(value):
    """`value` summed over the replicas (`value` itself without a strategy)."""
    return tf.distribute.get_replica_context().all_reduce("sum", value)


def apply_if_finite(optimizer, loss, grads, variables, counter):
    """Applies `grads` unless the loss or a gradient is not finite on a replica (as a
    LossScaleOptimizer does itself), counting skips in the metric `counter`.

    Returns `done`, a bool tensor for later reads of the variables to depend on: an update
    inside a `tf.cond` is not ordered before them otherwise. `train_step` threads it through
    every update of an iteration, so each step reads what the previous one left."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(x)) for x in [loss, *grads]])
    finite = sum_over_replicas(1.0 - tf.cast(finite, tf.float32)) == 0.0
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer.apply([tf.where(finite, g, math.nan) for g in grads], variables)
        done = tf.identity(finite)
    else:
        # Decided once, in cross-replica context: an update synchronises the replicas, which
        # a per-replica `tf.cond` branch may not do.
        def update(strategy, finite, grads):
            def apply():
                strategy.extended.call_for_each_replica(optimizer.apply,
                                                        args=(grads, variables))
                return tf.constant(True)

            def skip():
                return tf.constant(False)

            return tf.cond(strategy.experimental_local_results(finite)[0], apply, skip)

        done = tf.distribute.get_replica_context().merge_call(update, args=(finite, grads))
    first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
    counter.update_state(tf.cast(first & ~finite, tf.float32))  # once: metrics sum replicas
    return done


def unscaled(optimizer, grad):
    """`grad` without the loss scale of a `LossScaleOptimizer`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return grad / tf.cast(optimizer.dynamic_scale, grad.dtype)
    return grad


# --- NCFM: the min-max model -----------------------------------------------------------------

class Draw(typing.NamedTuple):
    """An iteration's randomness (`NCFM._draw`), the same on every replica."""
    blended: list            # the blended extractor's weights, lam*init + (1-lam)*trained
    trained: list            # the same member's trained weights (calibration)
    dsa: dict                # a siamese DSA draw per class of this replica, `[k, ...]` each
    frequency_seed: tf.Tensor    # int [2]: psi's noise, or t ~ N(0, I) (and class views)
    calibration_seed: tf.Tensor  # int [2]: calibration's DSA


class ImageSteps(typing.NamedTuple):
    """What a phase of image updates did: its summed loss, the squared norm of its gradients
    (without loss scaling) and `done`, ready once its last update is applied."""
    loss: tf.Tensor
    grad_square: tf.Tensor
    done: tf.Tensor

    def then(self, step):
        """These steps followed by `step`."""
        return ImageSteps(loss=self.loss + step.loss,
                          grad_square=self.grad_square + step.grad_square, done=step.done)


class NCFM(keras.Model):
    """NCFM distillation as a `keras.Model`: each `fit()` step, on class-balanced uint8 real
    batches `[K, batch_real, H, W, C]` (`class_balanced_batches`), is one iteration. Owns the
    synthetic images, psi and the pool (`[P, ...]` constants); under a `tf.distribute` strategy
    each of the R replicas matches its own K/R classes."""

    def __init__(self, data, config, pool, init_images=None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.num_classes = data.num_classes
        self.image_shape = data.image_shape
        self.local_classes = classes_per_replica(self.num_classes)
        # DSA's space: normalised with the dataset's statistics (official), or [0, 1] pixels.
        self.dsa_mean = None
        self.dsa_std = None
        if config.dsa_space == "normalized":
            self.dsa_mean = np.float32(data.mean)
            self.dsa_std = np.float32(data.std)
        # Classes through the network at once (peak memory): the largest divisor of the
        # replica's classes up to class_group.
        limit = min(config.class_group, self.local_classes)
        self.class_group = max(g for g in range(1, limit + 1) if self.local_classes % g == 0)

        # The pool: one network whose placeholder weights are replaced by a member's each step.
        network = build_network("convnet", data.image_shape, data.num_classes, data.mean,
                                data.std)
        network.trainable = False
        self.extractor = with_features(network)  # (features, logits)
        position = {id(w): i for i, w in enumerate(network.weights)}
        order = [position[id(w)] for w in self.extractor.non_trainable_variables]
        initial, trained = pool
        self.pool_initial = [tf.constant(np.stack([m[j] for m in initial])) for j in order]
        self.pool_trained = [tf.constant(np.stack([m[j] for m in trained])) for j in order]
        self.pool_size = len(initial)

        # The synthetic set. Replicas update it identically (`only_first_replica`: one copy).
        if init_images is None:
            feature_fn = None
            if config.init_from == "herding":
                feature_fn = pool_feature_fn(data, trained[0])
            init_images = initial_images(data, config.ipc, config.factor, config.init,
                                         config.seed, config.init_from, config.init_resize,
                                         feature_fn=feature_fn)
        self.synthetic = self.add_weight(shape=init_images.shape, initializer="zeros",
                                         dtype="float32", name="synthetic",
                                         aggregation="only_first_replica")
        self.synthetic.assign(init_images)
        self.labels = np.repeat(np.arange(data.num_classes), config.ipc).astype(np.int32)

        # psi, when on (it draws the frequencies of CF matching).
        self.sampler = None
        if config.sampling_net and config.loss == "cf":
            feature_dim = self.extractor.outputs[0].shape[-1]
            self.sampler = SamplingNet(feature_dim, config.num_freqs,
                                       max_scale=config.sampler_max_scale, seed=config.seed,
                                       name="sampler")

        # The completed iterations (they seed the randomness); the plateau's best loss and the
        # iterations since it (`_plateau`).
        self.iteration = self._counter("iteration", "int64", "zeros")
        self.plateau_best = self._counter("plateau_best", "float32",
                                          keras.initializers.Constant(math.inf))
        self.plateau_wait = self._counter("plateau_wait", "int32", "zeros")
        names = ["matching_loss", "calibration_loss", "image_grad_norm"]
        if self.sampler is not None:
            names += ["sampler_loss", "frequency_norm"]
        self.trackers = {name: keras.metrics.Mean(name) for name in names}
        self.trackers["nonfinite_steps"] = keras.metrics.Sum("nonfinite_steps")  # per epoch
        # The last step's values of those it computes (NaN for a norm that loss scaling
        # skipped), for the per-iteration metrics.csv; the trackers average over the epoch.
        computed = [name for name in names if name != "calibration_loss"]
        if config.calibration > 0:
            computed.append("calibration_loss")
        self.last_step = {name: self._counter(f"last_{name}", "float32", "zeros")
                          for name in computed}
        self.pool_dir = None  # where the pool is cached (absolute), set by build_distiller

    def _counter(self, name, dtype, initializer):
        return self.add_weight(shape=(), initializer=initializer, dtype=dtype, name=name,
                               trainable=False, aggregation="only_first_replica")

    def compile(self, image_optimizer, sampler_optimizer=None, **kwargs):
        """`image_optimizer` updates the pixels (as `self.optimizer`), `sampler_optimizer`
        psi."""
        super().compile(optimizer=image_optimizer, **kwargs)
        if self.sampler is not None:
            if sampler_optimizer is None:
                raise NCFMError("the sampling network needs a sampler_optimizer")
            if keras.config.dtype_policy().name == "mixed_float16":
                sampler_optimizer = keras.optimizers.LossScaleOptimizer(sampler_optimizer)
        self.sampler_optimizer = sampler_optimizer
        self.build_optimizers()  # before tracing: updates run inside a tf.cond

    def build_optimizers(self):
        """Creates both optimizers' variables (and psi's), as a resumed run must before it
        restores them."""
        if not self.optimizer.built:
            self.optimizer.build([self.synthetic])
        if self.sampler is not None:
            if not self.sampler.built:
                self.sampler(tf.zeros([2], tf.int32))
            if not self.sampler_optimizer.built:
                self.sampler_optimizer.build(self.sampler.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs=None):
        """The stored synthetic images `[K * ipc, H, W, C]` (the model's only output)."""
        return tf.convert_to_tensor(self.synthetic)

    def train_step(self, real, seed=None):
        """One NCFM iteration on `real`, uint8 `[k, batch_real, H, W, C]` (this replica's k
        classes), with `seed` int `[2]` (default: `_draw`'s). Returns the metrics (of all
        K)."""
        classes = replica_classes(self.local_classes)  # [k]: all K classes on one device
        draw = self._draw(seed, classes)
        real_features = self._real_features(real, draw)  # [k, B, D], constants for the tapes
        done = tf.constant(True)  # each update's `done` (see `apply_if_finite`)
        logs = {}

        # 1. psi: maximise the discrepancy (ascent, written as minimising its negative), like a
        #    GAN's critic. The features do not depend on psi: computed once. Without psi,
        #    t ~ N(0, I) (`_plain_frequencies`).
        t = self._plain_frequencies(draw.frequency_seed)
        if self.sampler is not None:
            syn_features = self._synthetic_features(draw, classes)  # [k, S, D]
            variables = self.sampler.trainable_variables
            for _ in range(self.config.sampler_steps):
                with tf.GradientTape() as tape:
                    t = self.sampler(draw.frequency_seed, training=True)  # [M, D]
                    ascent = -self._discrepancy(real_features, syn_features, t)
                    scaled = self.sampler_optimizer.scale_loss(ascent)  # identity unless fp16
                done = apply_if_finite(self.sampler_optimizer, ascent,
                                       tape.gradient(scaled, variables), variables,
                                       self.trackers["nonfinite_steps"])
            logs["sampler_loss"] = sum_over_replicas(-ascent)  # what psi saw before its step
            with tf.control_dependencies([done]):
                t = tf.stop_gradient(self.sampler(draw.frequency_seed, training=True))
            logs["frequency_norm"] = tf.reduce_mean(tf.norm(t, axis=-1))  # N(0, I): ~sqrt(D)

        # 2. images: minimise the discrepancy under the updated psi (`_image_steps`: one AdamW
        #    step per class, as the official code does).
        matching = self._image_steps(
            self._matching_loss, classes, after=done,
            per_class=dict(real_features=real_features, dsa=draw.dsa),
            shared=dict(weights=draw.blended, frequency_seed=draw.frequency_seed,
                        frequencies=t))
        logs["matching_loss"] = total = sum_over_replicas(matching.loss)
        norm = tf.sqrt(sum_over_replicas(matching.grad_square))
        finite = tf.math.is_finite(norm)  # not, when loss scaling skips an overflowing step
        done = matching.done

        # 3. calibration, a second pass of steps: the trained member must classify the images.
        if self.config.calibration > 0:
            calibration = self._image_steps(
                self._calibration_loss, classes, after=done, per_class={},
                shared=dict(trained=draw.trained, seed=draw.calibration_seed))
            logs["calibration_loss"] = sum_over_replicas(calibration.loss)
            total += logs["calibration_loss"]
            done = calibration.done

        # 4. clamp, once after all the steps; the learning-rate plateau sees the total loss.
        with tf.control_dependencies([done]):
            self.synthetic.assign(tf.clip_by_value(self.synthetic, 0.0, 1.0))
            self.iteration.assign_add(1)
            self._plateau(total)
        return self._record(logs, grad_norm=norm, finite=finite)

    def _record(self, logs, grad_norm, finite):
        """Updates the epoch's trackers and `last_step` with this step's `logs` and the images'
        gradient norm (left out of the mean, and NaN in `last_step`, where not `finite`); the
        metrics `fit()` shows."""
        for name, value in logs.items():
            self.trackers[name].update_state(value)
            self.last_step[name].assign(tf.cast(value, tf.float32))
        weight = tf.cast(finite, tf.float32)  # a skipped step's norm does not count
        self.trackers["image_grad_norm"].update_state(tf.where(finite, grad_norm, 0.0),
                                                      sample_weight=weight)
        self.last_step["image_grad_norm"].assign(tf.where(finite, grad_norm, math.nan))
        return {name: m.result() for name, m in self.trackers.items()}

    def _image_steps(self, loss, classes, after, per_class, shared):
        """The images descend on `loss(stored, classes, **per_class, **shared)`, a class
        group's loss of its stored images `[g, ipc, H, W, C]` (`per_class` holds `[k, ...]`
        inputs, cut to the group; `shared` is passed as it is), once the update `after` is
        done.

        `image_steps="per_class"` (the official code's loop): one AdamW step per class, each on
        the pixels the previous one left; the gradient is zero outside the class, but Adam's
        momentum and the weight decay move every pixel. `"summed"`: one step on the loss summed
        over the classes (`_summed_step`). Under a strategy each replica steps its own K/R
        classes, as the official data parallelism does. Returns `ImageSteps`."""
        if self.config.image_steps == "summed":
            return self._summed_step(loss, classes, after, per_class, shared)
        def class_step(j, steps):  # class j's update, on what the previous one left
            inputs = tf.nest.map_structure(lambda v: v[j][None], per_class)
            step = self._image_step(loss, classes[j][None], steps.done, inputs, shared)
            return steps.then(step)

        start = ImageSteps(tf.constant(0.0), tf.constant(0.0), tf.cast(after, tf.bool))
        return for_each_class(self.local_classes, class_step, start)

    def _image_step(self, loss, one, after, inputs, shared):
        """One update of the images on `loss` of the class `one` (int `[1]`) once `after` is
        done; its `ImageSteps`."""
        with tf.control_dependencies([after]):  # read the pixels the previous step left
            stored = self._stored_synthetic(one)
            with tf.GradientTape() as tape:
                tape.watch(stored)
                value = loss(stored, one, **inputs, **shared)
                scaled = self.optimizer.scale_loss(value)  # identity unless mixed float16
            grad = tape.gradient(scaled, stored)
        done = apply_if_finite(self.optimizer, value, [self._full_gradient(grad, one)],
                               [self.synthetic], self.trackers["nonfinite_steps"])
        square = tf.reduce_sum(tf.square(unscaled(self.optimizer, grad)))
        return ImageSteps(value, square, done)

    def _summed_step(self, loss, classes, after, per_class, shared):
        """One update of the images on `loss` summed over `classes`, computed a class group at
        a time (`class_group`): the group gradients together are the summed loss's gradient."""
        def group_gradient(group):
            stored, group_classes, inputs = group
            with tf.GradientTape() as tape:
                tape.watch(stored)
                value = loss(stored, group_classes, **inputs, **shared)
                scaled = self.optimizer.scale_loss(value)
            return value, tape.gradient(scaled, stored)

        with tf.control_dependencies([after]):
            losses, grads = self._map_groups(
                group_gradient, (self._stored_synthetic(classes), classes, per_class),
                (tf.float32, tf.float32))
        value = tf.reduce_sum(losses)
        grad = self._full_gradient(grads, classes)
        done = apply_if_finite(self.optimizer, value, [grad], [self.synthetic],
                               self.trackers["nonfinite_steps"])
        square = tf.reduce_sum(tf.square(unscaled(self.optimizer, grad)))
        return ImageSteps(value, square, done)

    def _discrepancy(self, real_features, syn_features, t):
        """`match_scale` x the loss summed over the classes of features `[g, B, D]`."""
        if self.config.loss == "mmd":
            per_class = mmd_loss(real_features, syn_features)
        else:
            per_class = cf_loss(real_features, syn_features, t, self.config.alpha,
                                self.config.beta)
        return self.config.match_scale * tf.reduce_sum(per_class)

    def _matching_loss(self, stored, classes, real_features, dsa, weights, frequency_seed,
                       frequencies):
        """A class group's matching loss: its stored images `[g, ipc, H, W, C]` decoded, after
        the group's `dsa` draw, through the extractor `weights`, against its `real_features`
        `[g, B, D]`, at the `frequencies` `[M, D]` of psi or of `_plain_frequencies`, or,
        with `frequency_draw="per_class"`, at t ~ N(0, I) drawn afresh per class from
        `frequency_seed` (the official configs); `"class_views"` matches each class's
        features in their own signed permutation (`_class_view`)."""
        syn_features = self._features(weights, self._decoded(stored), dsa)
        plain = self.sampler is None and self.config.loss == "cf"
        if plain and self.config.frequency_draw == "per_class":
            frequencies = self._class_frequencies(frequency_seed, classes)
        if plain and self.config.frequency_draw == "class_views":
            real_features = self._class_view(real_features, frequency_seed, classes)
            syn_features = self._class_view(syn_features, frequency_seed, classes)
        return self._discrepancy(real_features, syn_features, frequencies)

    def _calibration_loss(self, stored, classes, trained, seed):
        """A class group's calibration loss: `calibration` x the `trained` member's mean
        cross-entropy on each class's decoded images after DSA: one draw for all the images of
        a class, as the official code augments the class's batch (`calibration_augment=
        "per_class"`), or one per image."""
        decoded = self._decoded(stored)
        per_class = []
        for i, c in enumerate(tf.unstack(classes, num=classes.shape[0])):
            class_seed = tf.random.experimental.stateless_fold_in(seed, c, RNG)
            if self.config.calibration_augment == "per_class":
                params = dsa_parameters(class_seed, 1, self.image_shape[:2],
                                        self.config.augment)
                images = dsa_apply(decoded[i][None], params, mean=self.dsa_mean,
                                   std=self.dsa_std)[0]
            else:
                images = augment(decoded[i], class_seed, self.config.augment,
                                 mean=self.dsa_mean, std=self.dsa_std)
            _, logits = self._extract(trained, images)
            cross_entropy = keras.losses.sparse_categorical_crossentropy(
                tf.fill([decoded.shape[1]], c), tf.cast(logits, tf.float32), from_logits=True)
            per_class.append(tf.reduce_mean(cross_entropy))
        return self.config.calibration * tf.add_n(per_class)

    def matching_loss(self, real, seed):
        """For tests: the summed matching loss `train_step(real, seed)` sees before its first
        image step, without optimizer steps (psi's batch-norm statistics do move)."""
        classes = tf.range(self.num_classes)
        draw = self._draw(seed, classes)
        t = self._plain_frequencies(draw.frequency_seed)
        if self.sampler is not None:
            t = self.sampler(draw.frequency_seed, training=True)
        real_features = self._real_features(real, draw)

        def group_loss(group):
            stored, group_classes, group_features, dsa = group
            return self._matching_loss(stored, group_classes, group_features, dsa,
                                       draw.blended, draw.frequency_seed, t)

        stored = self._stored_synthetic(classes)
        losses = self._map_groups(group_loss, (stored, classes, real_features, draw.dsa),
                                  tf.float32)
        return tf.reduce_sum(losses)

    def _draw(self, seed, classes):
        """An iteration's randomness as a `Draw` for `classes`, from the int `[2]` `seed` or by
        default from the config's seed and the iteration only, so that iteration i draws the
        same numbers in a run that was interrupted and resumed."""
        if seed is None:
            start = tf.stack([self.config.seed, tf.cast(self.iteration, tf.int32)])
            seed = tf.random.stateless_uniform([2], start, minval=0, maxval=2 ** 30,
                                               dtype=tf.int32)
        blend_seed, dsa_seed, frequency_seed, calibration_seed = split_seed(seed, 4)
        member_seed, lam_seed = split_seed(blend_seed, 2)  # a pool member, lam ~ U(0, 1)
        member = tf.random.stateless_uniform([], member_seed, 0, self.pool_size, tf.int32,
                                             alg=RNG)
        lam = tf.random.stateless_uniform([], lam_seed, alg=RNG)
        blended, trained = self.blend(member, lam)
        params = dsa_parameters(dsa_seed, self.num_classes, self.image_shape[:2],
                                self.config.augment)
        dsa = tf.nest.map_structure(lambda p: tf.gather(p, classes), params)
        return Draw(blended=blended, trained=trained, dsa=dsa, frequency_seed=frequency_seed,
                    calibration_seed=calibration_seed)

    def blend(self, member, lam):
        """The weights `lam * init + (1 - lam) * trained` of pool `member`, and its trained
        ones."""
        trained = [tf.gather(w, member) for w in self.pool_trained]
        blended = [lam * tf.gather(w0, member) + (1.0 - lam) * w1
                   for w0, w1 in zip(self.pool_initial, trained)]
        return blended, trained

    def _plain_frequencies(self, seed):
        """Plain CF matching's t ~ N(0, I) `[M, D]`, one draw per iteration from the int `[2]`
        `seed`: shared by the classes (`frequency_draw="per_iteration"`) or seen by each in
        its own signed permutation (`"class_views"`). None with psi (which draws its own),
        for the MMD loss, and for `"per_class"` (`_class_frequencies`)."""
        if self.sampler is not None or self.config.loss != "cf":
            return None
        if self.config.frequency_draw == "per_class":
            return None
        shape = [self.config.num_freqs, self.extractor.outputs[0].shape[-1]]
        return tf.random.stateless_normal(shape, seed, alg=RNG)

    def _class_view(self, features, seed, classes):
        """Features `[g, N, D]` of `classes` `[g]`, each class's as x P_c: its columns in a
        random order with random signs, P_c a signed permutation matrix drawn from `seed` and
        the class (`frequency_draw="class_views"`).

        The official code draws t ~ N(0, I) afresh for each class. Matching x P_c at t is
        matching x at t P_c^T (<t_m, x P_c> = <t_m P_c^T, x>), and as P_c is drawn apart from
        t, the entries of t P_c^T are again independent standard normals: each class sees
        frequencies of exactly the official law, for a gather instead of K draws of `[M, D]`
        normals. The joint law differs: the classes see the same M frequencies up to a signed
        permutation of the coordinates (the same norms |t_m|, the same Gram matrix t t^T)."""
        dim = features.shape[-1]
        orders, signs = [], []
        for c in tf.unstack(classes, num=classes.shape[0]):
            order_seed, sign_seed = split_seed(
                tf.random.experimental.stateless_fold_in(seed, c, RNG), 2)
            orders.append(tf.argsort(tf.random.stateless_uniform([dim], order_seed, alg=RNG)))
            flips = tf.random.stateless_uniform([dim], sign_seed, alg=RNG) < 0.5
            signs.append(tf.where(flips, -1.0, 1.0))
        permuted = tf.gather(features, tf.stack(orders), axis=2, batch_dims=1)
        return permuted * tf.cast(tf.stack(signs), features.dtype)[:, None, :]

    def _class_frequencies(self, seed, classes):
        """Plain CF matching's t ~ N(0, I) `[g, M, D]` drawn afresh per class, from `seed`
        folded with the class, as the official code does (`frequency_draw="per_class"`)."""
        shape = [self.config.num_freqs, self.extractor.outputs[0].shape[-1]]
        draws = []
        for c in tf.unstack(classes, num=classes.shape[0]):
            class_seed = tf.random.experimental.stateless_fold_in(seed, c, RNG)
            draws.append(tf.random.stateless_normal(shape, class_seed, alg=RNG))
        return tf.stack(draws)

    def _extract(self, weights, images):
        """`(features, logits)` of the extractor with the given weights on `[N, H, W, C]`."""
        (features, logits), _ = self.extractor.stateless_call([], weights, images)
        return features, logits

    def _features(self, weights, images, params):
        """L2-normalised float32 features `[g, N, D]` of images `[g, N, H, W, C]` after DSA."""
        images = dsa_apply(images, params, mean=self.dsa_mean, std=self.dsa_std)
        features, _ = self._extract(weights, tf.reshape(images, [-1, *self.image_shape]))
        features = tf.reshape(tf.cast(features, tf.float32), [*images.shape[:2], -1])
        return tf.math.l2_normalize(features, -1)

    def _real_features(self, real, draw):
        """Features `[k, B, D]` of the augmented real batch (constants for the tapes)."""
        def group_features(group):
            images, dsa = group
            return self._features(draw.blended, to_float(images), dsa)

        return tf.stop_gradient(self._map_groups(group_features, (real, draw.dsa), tf.float32))

    def _synthetic_features(self, draw, classes):
        """Features `[k, S, D]` of the augmented decoded synthetic images of `classes`."""
        def group_features(group):
            stored, dsa = group
            return self._features(draw.blended, self._decoded(stored), dsa)

        return self._map_groups(group_features, (self._stored_synthetic(classes), draw.dsa),
                                tf.float32)

    def _stored_synthetic(self, classes):
        """The stored images of `classes` as `[k, ipc, H, W, C]`."""
        stored = tf.reshape(self.synthetic, [self.num_classes, -1, *self.image_shape])
        return tf.gather(stored, classes)

    def _decoded(self, stored):
        """`[g, ipc, H, W, C]` stored -> `[g, ipc*factor^2, H, W, C]` decoded images."""
        decoded = decode(tf.reshape(stored, [-1, *self.image_shape]), self.config.factor)
        return tf.reshape(decoded, [stored.shape[0], -1, *self.image_shape])

    def _full_gradient(self, grads, classes):
        """Gradients `[k, ipc, H, W, C]` of `classes` in a zero gradient of all the images."""
        full = tf.scatter_nd(classes[:, None], grads, [self.num_classes, *grads.shape[1:]])
        return tf.reshape(full, self.synthetic.shape)

    def _map_groups(self, fn, elems, output_signature):
        """`fn` on one class group `[g, ...]` of `elems` `[k, ...]` at a time; outputs are
        `[k, ...]` again, or one value per group for scalar outputs."""
        k = tf.nest.flatten(elems)[0].shape[0]
        g = self.class_group

        def to_groups(v):
            return tf.reshape(v, [k // g, g, *v.shape[1:]])

        def from_groups(v):
            if v.shape.rank == 1:
                return v
            return tf.reshape(v, [k, *v.shape[2:]])

        outputs = tf.map_fn(fn, tf.nest.map_structure(to_groups, elems),
                            fn_output_signature=output_signature, parallel_iterations=1)
        return tf.nest.map_structure(from_groups, outputs)

    def _plateau(self, loss):
        """Halves the image learning rate after more than `lr_patience` iterations without a
        relative 1e-4 improvement of `loss`, as the official code's `ReduceLROnPlateau`
        does."""
        improved = loss < self.plateau_best * (1.0 - 1e-4)
        self.plateau_best.assign(tf.where(improved, loss, self.plateau_best))
        wait = tf.where(improved, 0, self.plateau_wait + 1)
        reduce = wait > self.config.lr_patience
        self.plateau_wait.assign(tf.where(reduce, 0, wait))
        learning_rate = self.optimizer.learning_rate
        learning_rate.assign(tf.where(reduce, 0.5 * learning_rate, learning_rate))


# --- Evaluation ------------------------------------------------------------------------------

LABEL_MODES = {  # evaluation labels: name -> what trains the network
    "hard": "the class labels",
    "teacher": "the official soft labels: the teacher's softmax on each un-augmented image, "
               "softmax(one-hot) where it misclassifies; hard labels in the last epochs",
    "teacher_onehot": "as teacher, with the one-hot label where the teacher misclassifies",
    "teacher_per_batch": "the teacher's softmax on every augmented batch; hard labels in the "
                         "last epochs",
}
# The official code tests every 100 epochs and after the last, and trains on soft labels while
# its 1-based epoch < epochs - 100: the last 101 epochs are hard.
OFFICIAL_TEST_EVERY = 100
OFFICIAL_HARD_LABEL_EPOCHS = 101


def load_teacher(data, cache_dir, key, arch="convnet"):
    """The frozen soft-label teacher, pool member 0 trained, as the official code loads
    `premodel0_trained`; `NCFMError` if it is not in `cache_dir/key/` or does not fit `data`."""
    path = os.path.join(cache_dir, key, "member-000.npz")  # as `pretrain_pool` names it
    try:  # not os.path.isfile: a folder we may not enter is not "absent"
        _, trained = read_pool_member(path)
    except FileNotFoundError:
        raise NCFMError(f"the teacher's weights {path} do not exist; pass --pool_dir=<the folder "
                        f"that holds {key}/>, or re-run train.py with the same flags to rebuild it"
                        ) from None
    teacher = build_network(arch, data.image_shape, data.num_classes, data.mean, data.std)
    try:
        teacher.set_weights(trained)
    except ValueError as e:  # weights of other shapes
        raise NCFMError(f"{path} does not hold a teacher for {data.name} ({_cause(e)}); "
                        "delete it and re-run train.py to rebuild the pool") from None
    teacher.trainable = False
    return teacher


def test_accuracy(model, data):
    """`model`'s accuracy (%) on `data`'s test split: a soft-label teacher's own, stated beside
    the networks it teaches."""
    logits = model.predict(to_float(data.x_test), batch_size=1000, verbose=0)
    return float(100 * np.mean(logits.argmax(1) == data.y_test))


def teacher_targets(teacher, x, y, misclassified="official"):
    """Soft targets `[N, K]` from the teacher's logits on un-augmented float images `x` `[N, H,
    W, C]` in [0, 1] with int labels `y` `[N]`, as the official code does (`get_softlabel`,
    then `SoftCrossEntropy` at T = 1): softmax(logits) if correctly classified, else
    softmax(onehot), e / (e + K - 1) on its class; `misclassified="onehot"` gives the one-hot
    label instead."""
    if misclassified not in ("official", "onehot"):
        raise NCFMError(f"misclassified={misclassified!r}: use official or onehot")
    logits = teacher.predict(np.asarray(x, np.float32), batch_size=256, verbose=0)
    onehot = np.eye(logits.shape[1], dtype=np.float32)[y]
    wrong = (logits.argmax(1) != y)[:, None]
    if misclassified == "official":
        return tf.nn.softmax(np.where(wrong, onehot, logits)).numpy()
    return np.where(wrong, onehot, tf.nn.softmax(logits).numpy())


def evaluate_images(x, y, data, arch="convnet", protocol="ncfm", epochs=None, seed=0,
                    test_every=OFFICIAL_TEST_EVERY, verbose=0, labels="hard", teacher=None,
                    hard_label_epochs=OFFICIAL_HARD_LABEL_EPOCHS, callbacks=()):
    """Trains a fresh `arch` network on float images `x` `[N, H, W, C]` in [0, 1], int labels
    `y` `[N]` (or soft `[N, K]`), by `protocol` (PROTOCOLS key or `EvalProtocol`; `epochs`
    overrides its count), testing on `data`'s test split every `test_every` epochs and after
    the last. Soft `labels` (LABEL_MODES) need the frozen `teacher` (`load_teacher`) and train
    on `y` in the last `hard_label_epochs` epochs; `callbacks` see the training. Returns a dict
    of the settings, the `history` of `(epoch, accuracy in %)`, `final` (the last test, the
    headline) and `best_seen` (selected on the test set: the official statistic)."""
    if labels not in LABEL_MODES:
        raise NCFMError(f"labels={labels!r}: use one of {', '.join(LABEL_MODES)}")
    if labels != "hard" and teacher is None:
        raise NCFMError(f"labels={labels} needs a teacher (load_teacher)")
    protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    if epochs is not None:
        protocol = dataclasses.replace(protocol, epochs=int(epochs))
    soft = (teacher_targets(teacher, x, y, "official" if labels == "teacher" else "onehot")
            if labels in ("teacher", "teacher_onehot") else None)
    model = build_network(arch, data.image_shape, data.num_classes, data.mean, data.std,
                          seed=seed)
    test = (tf.data.Dataset.from_tensor_slices(
        (data.x_test, keras.utils.to_categorical(data.y_test, data.num_classes)))
        .batch(1000).map(lambda a, b: (to_float(a), b)).cache())
    epochs = protocol.epochs
    tested = [e for e in range(1, epochs + 1) if e % test_every == 0 or e == epochs]
    history = keras.callbacks.History()
    batch_teacher = teacher if labels == "teacher_per_batch" else None
    train_network(model, x, y, data.num_classes, protocol, seed=seed,
                  callbacks=[history, *callbacks], verbose=verbose, mean=data.mean,
                  std=data.std, soft=soft, teacher=batch_teacher,
                  hard_label_epochs=hard_label_epochs, test_data=test, test_epochs=tested)
    accuracies = [100.0 * a for a in history.history["val_accuracy"]]
    result = {"final": accuracies[-1], "best_seen": max(accuracies),
              "history": list(zip(tested, accuracies)), "epochs": epochs,
              "protocol": protocol.name, "arch": arch, "seed": seed, "labels": labels,
              "test_every": test_every}
    if labels != "hard":
        result["hard_label_epochs"] = min(hard_label_epochs, epochs)
    return result


def pool_feature_fn(data, weights):
    """Features `[N, D]` of float images `[N, H, W, C]` in [0, 1] by a ConvNet holding a pool
    member's `weights` (a list, as `read_pool_member` gives it)."""
    model = build_network("convnet", data.image_shape, data.num_classes, data.mean, data.std)
    model.set_weights(weights)
    return features_of(model)


def pretrained_feature_fn(data, seed=0, epochs=2):
    """Features of a ConvNet trained on the real data for `epochs` epochs of the "pretrain"
    protocol, as the herding baseline needs."""
    model = build_network("convnet", data.image_shape, data.num_classes, data.mean, data.std,
                          seed=seed)
    protocol = dataclasses.replace(PROTOCOLS["pretrain"], epochs=epochs)
    train_network(model, data.x_train, data.y_train, data.num_classes, protocol, seed=seed,
                  mean=data.mean, std=data.std)
    return features_of(model)


def summarize(runs):
    """`{"final": (mean, std), "best_seen": (mean, std)}` over repeated runs."""
    summary = {}
    for key in ("final", "best_seen"):
        values = [r[key] for r in runs]
        summary[key] = (float(np.mean(values)), float(np.std(values)))
    return summary


# --- The distilled-set file (docs/file-format.md) and atomic writes --------------------------

FILE_FORMAT = "ncfm-keras distilled set v1"
WRITING = threading.Lock()  # held by every write; a second signal exits only between them


@dataclasses.dataclass
class DistilledSet:
    """A distilled dataset as stored on disk: `images` `[K*ipc, H, W, C]` in [0, 1], `labels`
    `[K*ipc]`; `dataset`, `data_dir`, `data_digest` name its source data (see `Dataset`),
    `pool` (`{"dir", "key", "arch"}`: files `dir/key/member-*.npz`) the pool whose member 0
    teaches soft labels; `iterations` the distillation iterations the images have been through
    (what was done: `config["iterations"]` is what was asked). Older files lack the last four
    (None, {}, None)."""

    images: np.ndarray
    labels: np.ndarray
    ipc: int
    factor: int
    dataset: str
    class_names: list
    mean: np.ndarray
    std: np.ndarray
    config: dict
    data_dir: str = None
    data_digest: str = None
    pool: dict = dataclasses.field(default_factory=dict)
    iterations: int = None

    def decoded(self):
        """Training images and labels after multi-formation decoding."""
        x = decode(tf.constant(self.images, tf.float32), self.factor).numpy()
        return x, decode_labels(self.labels, self.factor)


def distilled_set(model, data):
    """An `NCFM`'s current synthetic images as a `DistilledSet` of `data`."""
    key = pool_key(data, "convnet", model.config.pretrain_epochs, model.config.seed)
    pool = {} if model.pool_dir is None else dict(dir=model.pool_dir, arch="convnet", key=key)
    return DistilledSet(model.synthetic.numpy(), model.labels, model.config.ipc,
                        model.config.factor, data.name, data.class_names, data.mean, data.std,
                        dataclasses.asdict(model.config), data_dir=data.data_dir,
                        data_digest=data.digest, pool=pool,
                        iterations=int(model.iteration.numpy()))


def save_distilled(path, distilled):
    """Validates a `DistilledSet` and writes it as an `.npz` file, atomically."""
    _validate_distilled(distilled, path)
    d = distilled
    optional = {k: getattr(d, k) for k in ("data_dir", "data_digest", "iterations")
                if getattr(d, k) is not None}
    save_npz(path, format=FILE_FORMAT, images=d.images.astype(np.float32),
             labels=d.labels.astype(np.int32), ipc=d.ipc, factor=d.factor, dataset=d.dataset,
             class_names=np.asarray(d.class_names, dtype=str), mean=d.mean.astype(np.float32),
             std=d.std.astype(np.float32), config=json.dumps(d.config), pool=json.dumps(d.pool),
             **optional)


def load_distilled(path):
    """Reads and validates a distilled-set file written by `save_distilled`; `NCFMError` naming
    the cause when it is absent, a folder, unreadable (permissions, cut short) or invalid."""
    if os.path.isdir(path):
        raise NCFMError(f"{path} is a folder; pass the distilled.npz train.py wrote (in it)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["format"]) != FILE_FORMAT:
                raise NCFMError(f"{path} is not an ncfm-keras distilled set (format "
                                f"'{f['format']}')")
            distilled = DistilledSet(
                f["images"], f["labels"], int(f["ipc"]), int(f["factor"]), str(f["dataset"]),
                [str(c) for c in f["class_names"]], f["mean"], f["std"],
                json.loads(str(f["config"])),
                **{k: str(f[k]) for k in ("data_dir", "data_digest") if k in f.files},
                pool=json.loads(str(f["pool"])) if "pool" in f.files else {},
                iterations=int(f["iterations"]) if "iterations" in f.files else None)
    except NCFMError:
        raise
    except FileNotFoundError:  # not os.path.isfile: a folder we may not enter is not "absent"
        raise NCFMError(f"distilled-set file {path} does not exist; pass the .npz train.py "
                        "wrote") from None
    except Exception as e:  # zip, pickle, key and JSON errors all mean the same thing
        raise NCFMError(f"{path} is not a readable distilled-set file "
                        f"{_unreadable(e, 're-create it with train.py')}") from None
    _validate_distilled(distilled, path)
    return distilled


def _validate_distilled(d, path):
    k, problems = len(d.class_names), []
    shape = list(d.images.shape)
    if d.images.ndim != 4 or d.images.shape[0] != k * d.ipc:
        problems.append(f"images have shape {d.images.shape}, expected [{k}*{d.ipc}, H, W, C]")
    elif shape[1] in (1, 3) and shape[3] not in (1, 3):  # from PyTorch, say
        problems.append(f"images have shape {shape}: channels first (NCHW); ncfm-keras stores "
                        f"channels last (NHWC): transpose it to [N, H, W, C] "
                        f"({[shape[0], shape[2], shape[3], shape[1]]}: "
                        "images.transpose(0, 2, 3, 1))")
    elif d.factor < 1 or d.images.shape[1] % d.factor or d.images.shape[2] % d.factor:
        problems.append(f"factor {d.factor} does not divide the image size")
    if d.labels.shape != (k * d.ipc,) or np.any((d.labels < 0) | (d.labels >= k)):
        problems.append("labels do not match the classes")
    if not np.all((d.images >= 0) & (d.images <= 1)):  # NaN compares False
        problems.append("images are not finite values in [0, 1]")
    if problems:
        raise NCFMError(f"{path}: invalid distilled set: {'; '.join(problems)}")


def data_of(distilled, path, dataset=None, data_dir=None, image_size=None):
    """The data a distilled set (read from `path`) was distilled from, loaded: by default from
    where the set says it came from, or any spelling of it (`dataset`, `data_dir`; `image_size`
    for a folder, default the set's); its content digest decides. Files without a digest: the
    name must match. `NCFMError` naming the difference when the data is not the set's."""
    name = dataset_name(dataset or distilled.dataset)
    if not (dataset or data_dir):
        data_dir = distilled.data_dir
    if not (distilled.data_digest or name == distilled.dataset):
        raise NCFMError(f"--dataset={name} but {path} was distilled from {distilled.dataset}; "
                        "drop --dataset")
    folder = name.startswith("folder:")
    if folder and not dataset and not os.path.isdir(name[len("folder:"):]):
        raise NCFMError(f"{path} was distilled from {name}, which does not exist (any more); "
                        "pass --dataset=folder:PATH where that data is now")
    data = load_dataset(name, data_dir, image_size or distilled.images.shape[1])
    where = data.name
    if data.data_dir:
        where += f" in {data.data_dir}"
    shape = list(distilled.images.shape[1:])
    if data.image_shape[:2] == MNIST_SIZE and shape[:2] == [32, 32]:
        raise NCFMError(f"{path} holds 32x32 images of {where}'s 28x28 ones: an ncfm-keras "
                        "before 2026-12 padded 28x28 data to 32x32 with black pixels; "
                        "re-distil it with train.py")
    if data.class_names != distilled.class_names:
        difference = _class_difference(distilled.class_names, data.class_names)
        raise NCFMError(f"{path} holds other classes than {where} ({difference}); pass the data "
                        "it was distilled from (--dataset, --data_dir)")
    if data.image_shape != tuple(shape):
        raise NCFMError(f"{path} holds images of shape {shape} [H, W, C], {where} has "
                        f"{list(data.image_shape)}; pass the data it was distilled from "
                        "(--dataset, --data_dir, --image_size for a folder)")
    if distilled.data_digest not in (None, data.digest):
        origin = distilled.dataset
        if distilled.data_dir:
            origin += f" in {distilled.data_dir}"
        raise NCFMError(f"{where} is not the data {path} was distilled from ({origin}): the "
                        "same classes and image size but other images; pass that data "
                        "(--dataset, --data_dir)")
    return data


def _class_difference(theirs, ours):
    """The first difference between a set's class names and the data's (they differ), for an
    error message: `10 classes there, 3 here` or `class 0 is 'shirt' there, 'Shirt' here`."""
    if len(theirs) != len(ours):
        return f"{len(theirs)} classes there, {len(ours)} here"
    first = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    return f"class {first} is '{theirs[first]}' there, '{ours[first]}' here"


def distilled_teacher(distilled, data, pool_dir=None, path="the distilled set"):
    """The soft-label teacher (`load_teacher`) of a distilled set: member 0 of its recorded
    pool, in `pool_dir` if given; older files without a record name their pool by their
    settings."""
    key = distilled.pool.get("key")
    if key is None and {"pretrain_epochs", "seed"} <= distilled.config.keys():
        key = pool_key(data, "convnet", distilled.config["pretrain_epochs"],
                       distilled.config["seed"])
    directory = pool_dir or distilled.pool.get("dir")
    if key is None or directory is None:
        raise NCFMError(f"{path} does not record the pool it was distilled with; pass "
                        "--pool_dir=<the --pool_dir of the train.py run that wrote it>")
    return load_teacher(data, directory, key, distilled.pool.get("arch", "convnet"))


def atomic_write(path, write, mode):
    """Calls `write(file)` on a temporary file opened in `mode` beside `path`, syncs it and
    renames it onto `path`: readers see the old complete file or the new one, never a part. The
    new file keeps the mode of the one it replaces, else gets the one the umask gives (not the
    temporary file's 0600). `NCFMError` naming the file and the cause (the system's own words)
    when it cannot be written; the previous version, if any, is then intact."""
    try:
        _replace_atomically(path, write, mode)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_cause(e)}; its previous version, if "
                         "any, is intact") from None


def _replace_atomically(path, write, mode):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with WRITING:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path),
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            os.chmod(tmp, _file_mode(path))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _file_mode(path):
    """The permission bits a new version of `path` gets: the old version's, else 0666 less the
    process's umask."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)  # reading the umask means setting it, then setting it back
    os.umask(umask)
    return 0o666 & ~umask


def check_writable(directory, flag):
    """Creates `directory` and writes (then removes) a file in it, so that a folder the run
    cannot write fails before any long work: `NCFMError` naming `flag`, the folder and the
    cause."""
    probe = os.path.join(directory, ".ncfm-write-test")
    try:
        _replace_atomically(probe, lambda f: f.write("ok"), "w")
        os.remove(probe)
    except OSError as e:
        raise NCFMError(f"{flag}={directory} cannot be written ({_cause(e)}); choose "
                        f"another {flag}") from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2)), "w")


def save_npz(path, **arrays):
    """`np.savez` of `arrays` to `path` (as named: savez would append `.npz`), atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays), "wb")


# --- The distiller: the pool, then a compiled NCFM on the devices chosen ---------------------

def set_precision(precision="auto"):
    """Sets the Keras dtype policy and returns its name: `auto` is mixed_float16 on a GPU,
    float32 elsewhere (mixed_bfloat16 suits CPUs with bf16 units). Raises `NCFMError`."""
    if precision == "auto":
        precision = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
        raise NCFMError(f"unknown precision '{precision}'; use auto, float32, mixed_float16 "
                        "or mixed_bfloat16")
    keras.mixed_precision.set_global_policy(precision)
    return precision


def check_distillable(data, config):
    """`NCFMError` unless `data`'s classes hold the real images `config` needs: `ipc` each, and
    ipc*factor^2 for the mix init."""
    check_ipc(data, config.ipc)
    needed = config.ipc * config.factor ** 2
    smallest = data.class_counts().min()
    if config.init == "mix" and needed > smallest:
        raise NCFMError(f"init=mix with ipc={config.ipc} and factor={config.factor} needs "
                        f"{needed} real images per class, the smallest class holds "
                        f"{smallest}; lower ipc or use init=real")


def build_distiller(data, config, pool_dir, jit_compile="auto", verbose=1, strategy=None,
                    pool_callbacks=()):
    """The pool (trained or loaded; `pool_callbacks` see its training), then a compiled `NCFM`
    built in `strategy`'s scope, with the official optimizers: AdamW on the pixels, SGD
    (momentum 0.5) on psi. XLA by default on a GPU only (oneDNN's CPU kernels are faster
    here), never under a strategy (as Keras does)."""
    check_distillable(data, config)
    pool = pretrain_pool(data, config.num_pretrained, config.pretrain_epochs, pool_dir,
                         seed=config.seed, verbose=verbose, callbacks=pool_callbacks)
    jit_compile = use_xla(jit_compile, strategy)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = NCFM(data, config, pool)
        model.pool_dir = os.path.abspath(pool_dir)
        model.compile(
            image_optimizer=keras.optimizers.AdamW(config.image_lr,
                                                   weight_decay=config.image_weight_decay),
            sampler_optimizer=keras.optimizers.SGD(config.sampler_lr, momentum=0.5,
                                                   weight_decay=config.sampler_weight_decay),
            jit_compile=jit_compile)
    return model


def use_xla(jit_compile="auto", strategy=None):
    """Whether the step is compiled with XLA: `jit_compile` (True, False or "auto": on a GPU
    only, never under a strategy, as Keras does)."""
    if jit_compile != "auto":
        return bool(jit_compile)
    return bool(tf.config.list_physical_devices("GPU")) and strategy is None


def mirrored_strategy():
    """A `MirroredStrategy` over the visible GPUs, else over the logical CPUs (`split_cpu`)."""
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def split_cpu(count):
    """Splits the CPU into `count` logical devices (call before TensorFlow runs anything)."""
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0], [
        tf.config.LogicalDeviceConfiguration() for _ in range(count)])
