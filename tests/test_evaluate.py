import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

import ncfm_keras as nk


def test_evaluation_learns_from_a_small_real_subset(small_fashion_mnist):
    x, y = nk.random_subset(small_fashion_mnist, ipc=10, seed=0)
    result = nk.evaluate_images(x, y, small_fashion_mnist, "convnet", "dm", epochs=30,
                                test_every=10)
    assert [e for e, _ in result["history"]] == [10, 20, 30]
    assert result["final"] == result["history"][-1][1]
    assert result["best_seen"] == max(a for _, a in result["history"]) >= result["final"]
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
    protocol = dataclasses.replace(nk.PROTOCOLS["dm"], strategy="cutout", batch_size=8)
    for space, fill in (("normalized", 0.3), ("pixel", 0.0)):
        stream = nk._training_stream(x, y, dataclasses.replace(protocol, dsa_space=space), 0,
                                     np.array([0.3]), np.array([0.2]))
        images = next(iter(stream))[0].numpy()
        np.testing.assert_allclose(np.unique(images.round(5)), [fill, 1.0])  # holes: fill
    with pytest.raises(nk.NCFMError, match="dsa_space='rgb' is unknown"):
        dataclasses.replace(protocol, dsa_space="rgb")
    model = nk.build_network("convnet", (16, 16, 1), 2, [0.3], [0.2])
    with pytest.raises(nk.NCFMError, match="needs the dataset's mean and std"):
        nk.train_network(model, x, y, 2, protocol)


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
    nk.plot_metrics(csv, tmp_path / "curves.png")
    from PIL import Image
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    assert image.shape[1] > 3 * image.shape[0]  # four panels side by side
    assert image.std() > 5  # not blank


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
