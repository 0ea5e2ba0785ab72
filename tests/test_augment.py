import numpy as np
import pytest
import tensorflow as tf

import ncfm_keras as nk

SEED = tf.constant([1, 2])


def _images(n=6, size=16, channels=3, seed=0):
    return tf.random.stateless_uniform([n, size, size, channels], [seed, 7])


def test_identity_and_integer_shift_are_exact():
    x = _images(2)[None]  # one group of two images
    identity = tf.constant([[1.0, 0, 0, 0, 1.0, 0]])
    np.testing.assert_allclose(nk._bilinear_warp(x, identity), x, atol=1e-6)
    # Sampling 3 pixels to the right: out[:, :, j] = x[:, :, j + 3], zeros past the edge.
    shift = tf.constant([[1.0, 0, 2 * 3 / 16, 0, 1.0, 0]])
    out = nk._bilinear_warp(x, shift).numpy()
    np.testing.assert_allclose(out[..., :13, :], x.numpy()[..., 3:, :], atol=1e-6)
    assert np.all(out[..., 13:, :] == 0)


def test_siamese_parameters_are_shared_within_a_group():
    real = _images(4 * 5).numpy().reshape(4, 5, 16, 16, 3)
    synthetic = real[:, :2] + 0.0  # the first two images of every group, as a separate tensor
    params = nk.dsa_parameters(SEED, 4, (16, 16), "color_crop_cutout_flip_scale_rotate")
    out_real = nk.dsa_apply(tf.constant(real), params).numpy()
    out_syn = nk.dsa_apply(tf.constant(synthetic), params).numpy()
    np.testing.assert_allclose(out_syn, out_real[:, :2], atol=1e-5)
    # Identical images in one group stay identical; different groups get different draws.
    same = np.repeat(real[:, :1], 3, axis=1)
    out_same = nk.dsa_apply(tf.constant(same), params).numpy()
    np.testing.assert_allclose(out_same[:, 0], out_same[:, 2], atol=1e-6)
    same_everywhere = np.repeat(real[:1, :1], 4, axis=0)
    out_groups = nk.dsa_apply(tf.constant(same_everywhere), params).numpy()
    assert not np.allclose(out_groups[0], out_groups[1])


def test_parameters_follow_the_spec_ranges():
    p = nk.dsa_parameters(SEED, 4000, (32, 32), "color_crop_cutout_flip_scale_rotate")
    assert 0.4 < p["flip"].numpy().mean() < 0.6
    assert -0.5 <= p["brightness"].numpy().min() and p["brightness"].numpy().max() <= 0.5
    assert 0 <= p["saturation"].numpy().min() and p["saturation"].numpy().max() <= 2
    assert 0.5 <= p["contrast"].numpy().min() and p["contrast"].numpy().max() <= 1.5
    theta = p["theta"].numpy()
    kinds = {"crop": np.isclose(theta[:, [0, 4]], 1).all(1) & (theta[:, 1] == 0),
             "rotate": np.isclose(theta[:, 0], theta[:, 4]) & (theta[:, 1] != 0)}
    kinds["scale"] = ~kinds["crop"] & ~kinds["rotate"]
    for kind, mask in kinds.items():  # one of crop / scale / rotate, each about a third
        assert 0.28 < mask.mean() < 0.39, kind
    shifts = theta[kinds["crop"]][:, [2, 5]] * 32 / 2
    np.testing.assert_allclose(shifts, np.round(shifts), atol=1e-5)
    assert np.abs(shifts).max() == 4  # crop ratio 0.125 of 32
    scales = theta[kinds["scale"]][:, [0, 4]]
    assert 1 / 1.2 - 1e-6 <= scales.min() and scales.max() <= 1.2 + 1e-6
    angles = np.arctan2(theta[kinds["rotate"]][:, 1], theta[kinds["rotate"]][:, 0])
    assert np.abs(angles).max() <= np.deg2rad(15) + 1e-6


def test_geometric_ops_keep_the_value_range_and_cutout_blanks_a_quarter():
    x = _images(64, 32, 1)
    out = nk.augment(x, SEED, "crop_flip_scale_rotate").numpy()
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    ones = tf.ones([256, 32, 32, 1])
    blank = 1 - nk.augment(ones, SEED, "cutout").numpy().mean(axis=(1, 2, 3))
    assert 0.1 < blank.mean() < 0.25 and blank.max() <= 0.25 + 1e-6  # a 16x16 hole, clipped


def test_gradients_reach_the_inputs():
    x = tf.Variable(_images(3)[None])
    params = nk.dsa_parameters(SEED, 1, (16, 16), "color_crop_cutout_flip_scale_rotate")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(nk.dsa_apply(x, params)))
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@pytest.mark.parametrize("ops", ["color_crop_cutout", "color_crop_flip_scale_rotate"])
def test_works_under_xla(ops):
    x = tf.constant(_images(4 * 3).numpy().reshape(4, 3, 16, 16, 3))
    params = nk.dsa_parameters(SEED, 4, (16, 16), ops)
    compiled_apply = tf.function(nk.dsa_apply, jit_compile=True)
    np.testing.assert_allclose(compiled_apply(x, params), nk.dsa_apply(x, params), atol=1e-5)

    # The whole augmentation, parameters included, compiles too (XLA may draw other numbers).
    run = tf.function(lambda images, seed: nk.dsa_apply(
        images, nk.dsa_parameters(seed, 4, (16, 16), ops)), jit_compile=True)
    first, again = run(x, SEED), run(x, SEED)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, run(x, SEED + 1))


def test_cutmix_mixes_labels_by_area():
    x = tf.concat([tf.zeros([4, 16, 16, 1]), tf.ones([4, 16, 16, 1])], 0)
    y = tf.one_hot([0] * 4 + [1] * 4, 2)
    for s in range(5):
        mixed, labels = nk.cutmix(x, y, tf.constant([s, 3]))
        np.testing.assert_allclose(tf.reduce_sum(labels, 1), 1.0, atol=1e-6)
        # The label weight of class 1 equals the share of pixels that came from a class-1 image.
        np.testing.assert_allclose(labels[:, 1], tf.reduce_mean(mixed, [1, 2, 3]), atol=1e-6)


def test_unknown_augmentation_is_rejected():
    with pytest.raises(nk.NCFMError, match="unknown augmentation 'zoom'"):
        nk.parse_augment("color_zoom")


MEAN, STD = np.array([0.2, 0.5, 0.7], np.float32), np.array([0.3, 0.1, 0.25], np.float32)


def test_brightness_in_normalised_space_moves_pixels_by_std_units():
    x = _images(4)
    b = tf.constant([-0.5, -0.1, 0.2, 0.45])
    params = {"brightness": b, "saturation": tf.ones([4]), "contrast": tf.ones([4])}
    moved = nk.dsa_apply(x, params, MEAN, STD) - x
    np.testing.assert_allclose(moved, np.broadcast_to(b.numpy()[:, None, None, None] * STD,
                                                      x.shape), atol=1e-5)
    np.testing.assert_allclose(nk.dsa_apply(x, params) - x,  # pixel space: by b itself
                               np.broadcast_to(b.numpy()[:, None, None, None], x.shape),
                               atol=1e-5)


@pytest.mark.parametrize("kind,theta", [
    ("crop", [1.0, 0, 2 * 3 / 16, 0, 1.0, -2 * 2 / 16]),
    ("scale", [1.2, 0, 0, 0, 1.15, 0]),
    ("rotate", [np.cos(0.25), np.sin(0.25), 0, -np.sin(0.25), np.cos(0.25), 0]),
    ("cutout", None),
])
def test_every_fill_is_the_mean_colour_in_normalised_space(kind, theta):
    x = _images(3)
    if kind == "cutout":
        params = {"cutout_y": tf.constant([0, 5, 12]), "cutout_x": tf.constant([-3, 6, 9])}
    else:
        params = {"theta": tf.constant([theta] * 3, tf.float32)}
    # Geometric ops and cutout are linear in the pixels; a pixel's coverage (the op applied
    # to ones in pixel space) is the share of it that comes from the image, the rest is fill.
    coverage = nk.dsa_apply(tf.ones_like(x), params).numpy()
    pixel = nk.dsa_apply(x, params).numpy()
    normalised = nk.dsa_apply(x, params, MEAN, STD).numpy()
    np.testing.assert_allclose(normalised, pixel + MEAN * (1 - coverage), atol=1e-5)
    filled = coverage == 0
    assert filled[..., 0].sum() >= 3  # every kind leaves some pixels entirely filled
    np.testing.assert_allclose(normalised[filled], np.broadcast_to(MEAN, x.shape)[filled],
                               atol=1e-6)
    assert np.all(pixel[filled] == 0)  # pixel space fills with black


def test_normalised_space_keeps_gradients_and_compiles_under_xla():
    x = tf.Variable(tf.reshape(_images(4 * 3), [4, 3, 16, 16, 3]))
    params = nk.dsa_parameters(SEED, 4, (16, 16), "color_crop_cutout_flip_scale_rotate")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(nk.dsa_apply(x, params, MEAN, STD)))
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
    compiled_apply = tf.function(nk.dsa_apply, jit_compile=True)
    np.testing.assert_allclose(compiled_apply(x, params, MEAN, STD),
                               nk.dsa_apply(x, params, MEAN, STD), atol=1e-5)
    assert not np.allclose(nk.dsa_apply(x, params, MEAN, STD), nk.dsa_apply(x, params))


def test_mean_without_std_is_rejected():
    with pytest.raises(nk.NCFMError, match="only one of mean and std"):
        nk.augment(_images(2), SEED, "color", mean=MEAN)
