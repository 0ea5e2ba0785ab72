import numpy as np
import pytest
import keras
import tensorflow as tf

import ncfm_keras as nk
import runs


# ---- cf_loss against an independent numpy reference (paper Eq. 6-8) ----

def reference_cf_loss(a, b, t, alpha=0.5, beta=0.5):
    """The paper's Eq. 6-8 written with complex numbers, in float64."""
    phi_a = np.exp(1j * (a.astype(np.float64) @ t.T)).mean(0)  # [M]
    phi_b = np.exp(1j * (b.astype(np.float64) @ t.T)).mean(0)
    amplitude = (np.abs(phi_a) - np.abs(phi_b)) ** 2
    phase = np.maximum(2 * (np.abs(phi_a) * np.abs(phi_b) - (phi_a * np.conj(phi_b)).real), 1e-12)
    return np.mean(np.sqrt(alpha * amplitude + beta * phase))


def _features(seed, n, d=8):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cf_loss_matches_reference():
    a, b = _features(0, 40), _features(1, 7) * 0.5 + 0.2
    t = np.random.default_rng(2).normal(size=(64, 8)).astype(np.float32) * 3
    for alpha, beta in ((0.5, 0.5), (0.9, 0.1), (1.0, 0.0)):
        np.testing.assert_allclose(nk.cf_loss(a, b, t, alpha, beta),
                                   reference_cf_loss(a, b, t, alpha, beta), rtol=2e-5)


def test_cf_loss_closed_forms():
    a, b = _features(3, 16), _features(4, 5)
    t = np.random.default_rng(5).normal(size=(32, 8)).astype(np.float32)
    # Identical sets: zero up to float32 cancellation inside the phase term (~1e-8 under
    # the square root), far below the loss of different sets.
    assert float(nk.cf_loss(a, a, t)) < 3e-4 < 0.01 < float(nk.cf_loss(a, b, t))
    np.testing.assert_allclose(nk.cf_loss(a, b, t), nk.cf_loss(b, a, t), rtol=1e-6)
    # One point each: |Phi| = 1, so amplitude = 0 and phase = 2 (1 - cos <t, x - y>).
    x, y = a[:1], b[:1]
    expected = np.mean(np.sqrt(0.5 * 2 * (1 - np.cos(t @ (x - y)[0]))))
    np.testing.assert_allclose(nk.cf_loss(x, y, t), expected, rtol=1e-5)


def test_cf_loss_batched_over_classes_and_float16_inputs():
    a = np.stack([_features(i, 12) for i in range(3)])
    b = np.stack([_features(10 + i, 4) for i in range(3)])
    t = np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32)
    batched = nk.cf_loss(a, b, t).numpy()
    assert batched.shape == (3,)
    np.testing.assert_allclose(batched, [reference_cf_loss(a[i], b[i], t) for i in range(3)],
                               rtol=2e-5)
    half = nk.cf_loss(tf.constant(a, tf.float16), tf.constant(b, tf.float16), t)
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half, batched, rtol=5e-3)


def test_cf_loss_gradients_are_finite():
    a = tf.constant(_features(0, 10))
    b = tf.Variable(_features(1, 3))
    t = tf.Variable(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = nk.cf_loss(a, b, t)
    grad_b, grad_t = tape.gradient(loss, [b, t])
    assert np.all(np.isfinite(grad_b)) and np.all(np.isfinite(grad_t))
    assert np.abs(grad_b.numpy()).sum() > 0


def test_mmd_loss_is_the_mean_feature_distance():
    a, b = _features(0, 9), _features(1, 4)
    np.testing.assert_allclose(nk.mmd_loss(a, b), np.sum((a.mean(0) - b.mean(0)) ** 2),
                               rtol=1e-5)


def test_sampling_net_is_a_scale_mixture():
    net = nk.SamplingNet(feature_dim=8, num_freqs=64)
    t = net(tf.constant([1, 2]), training=True).numpy()
    assert t.shape == (64, 8) and np.all(np.isfinite(t))
    np.testing.assert_array_equal(net(tf.constant([1, 2]), training=True), t)  # seeded
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(tf.square(net(tf.constant([1, 2]), training=True)))
    grads = tape.gradient(out, net.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    with pytest.raises(nk.NCFMError, match="multiple of 16"):
        nk.SamplingNet(8, 40)
    with pytest.raises(nk.NCFMError, match="must be > 1"):
        nk.SamplingNet(8, 64, max_scale=1.0)


def test_sampling_net_ascent_cannot_widen_frequencies_past_its_bound():
    """psi starts near t ~ N(0, I); an ascent that rewards wide frequencies (as the CF loss of
    a few images does) saturates at max_scale instead of running off."""
    net = nk.SamplingNet(feature_dim=64, num_freqs=1024, max_scale=2.0)
    optimizer = keras.optimizers.SGD(0.5)

    def mean_norm(step):
        return float(tf.reduce_mean(tf.norm(net(tf.constant([step, 0]), training=True), axis=-1)))

    assert abs(mean_norm(0) / 8.0 - 1) < 0.25  # E|N(0, I_64)| ~ 8
    for step in range(100):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(tf.square(net(tf.constant([step, 1]), training=True)))
        optimizer.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)
    assert 1.5 * 8.0 < mean_norm(1000) <= 2.0 * 8.0 * 1.05


# ---- the synthetic set and the model ----------------------------------------------------------

def test_mix_init_holds_downsampled_real_images_of_each_class(small_fashion_mnist):
    d = small_fashion_mnist
    images = nk.initial_images(d, ipc=2, factor=2, init="mix", seed=0, init_from="random",
                               resize="area")
    assert images.shape == (20, 28, 28, 1) and 0 <= images.min() and images.max() <= 1
    decoded = nk.decode(tf.constant(images), 2).numpy()
    assert decoded.shape == (80, 28, 28, 1)
    real, _ = nk.random_subset(d, 8, seed=0)  # the same draw the init used
    # Decoded cell k of stored image i (of a class) is its chosen image k*ipc + i, down- then
    # up-sampled: close, not equal.
    order = [c * 8 + k * 2 + i for c in range(10) for i in range(2) for k in range(4)]
    error = np.abs(decoded - real[order]).mean(axis=(1, 2, 3))
    assert np.all(error < 0.12), error.max()
    assert nk.initial_images(d, 3, 1, "real").shape == (30, 28, 28, 1)
    noise = nk.initial_images(d, 1, 2, "noise")
    assert 0.4 < noise.mean() < 0.6
    with pytest.raises(nk.NCFMError, match="factor=3 must"):
        nk.initial_images(d, 1, 3, "mix")
    with pytest.raises(nk.NCFMError,
                       match="unknown init_from 'last'; use first or random or herding"):
        nk.initial_images(d, 1, 2, "mix", init_from="last")


def test_official_mix_init_by_hand(small_fashion_mnist):
    """The official `mix` init: each class's first ipc*factor^2 images, cell (r, c) of stored
    image i holding image (r*factor + c)*ipc + i downsampled as torch's nearest (every second
    pixel for 28 -> 14)."""
    d = small_fashion_mnist
    images = nk.initial_images(d, ipc=2, factor=2, init="mix")  # the defaults: first, nearest
    for c in range(10):
        first = d.x_train[np.flatnonzero(d.y_train == c)[:8]].astype(np.float32) / 255.0
        for i in range(2):
            stored = images[c * 2 + i]
            for r in range(2):
                for col in range(2):
                    cell = stored[14 * r:14 * (r + 1), 14 * col:14 * (col + 1)]
                    np.testing.assert_array_equal(cell, first[(r * 2 + col) * 2 + i][::2, ::2])
    real = nk.initial_images(d, ipc=3, factor=2, init="real")
    first = d.x_train[np.flatnonzero(d.y_train == 0)[:3]].astype(np.float32) / 255.0
    np.testing.assert_array_equal(real[:3], first)


def _pool(data, members=2, distinct=True):
    """Members whose 'trained' weights are just another random initialisation."""
    initial, trained = [], []
    for m in range(members):
        for store, seed in ((initial, 2 * m), (trained, 2 * m + 1 if distinct else 2 * m)):
            net = nk.build_network("convnet", data.image_shape, data.num_classes, data.mean,
                                   data.std, seed=seed)
            store.append([w.numpy() for w in net.weights])
    return initial, trained


def test_herding_init_holds_herdings_choice_on_pool_member_0(small_fashion_mnist):
    """init_from=herding: the mix cells hold `herding_subset`'s images, in its order, on the
    features of the pool's member 0 (trained weights), as the NCFM model builds them."""
    d = small_fashion_mnist
    pool = _pool(d)
    chosen, _ = nk.herding_subset(d, 8, nk.pool_feature_fn(d, pool[1][0]))
    first, _ = nk.first_subset(d, 8)
    assert not np.array_equal(chosen, first)  # herding chose other images than the first
    config = nk.DistillConfig(ipc=2, factor=2, num_freqs=64, init_from="herding")
    images = nk.NCFM(d, config, pool).synthetic.numpy()
    # Class c's stored image i, cell (r, col), holds its chosen image (r*2 + col)*2 + i.
    for c in range(10):
        for i in range(2):
            for r in range(2):
                for col in range(2):
                    cell = images[c * 2 + i, 14 * r:14 * (r + 1), 14 * col:14 * (col + 1)]
                    expected = chosen[c * 8 + (r * 2 + col) * 2 + i][::2, ::2]
                    np.testing.assert_array_equal(cell, expected)
    with pytest.raises(nk.NCFMError, match="needs the features it selects on"):
        nk.initial_images(d, 1, 2, "mix", init_from="herding")


def _model(data, **config):
    settings = dict(ipc=1, factor=2, batch_real=8, num_freqs=64, num_pretrained=2,
                    pretrain_epochs=0, image_lr=0.01, sampler_lr=0.01, sampling_net=True)
    settings.update(config)
    model = nk.NCFM(data, nk.DistillConfig(**settings), _pool(data))
    model.compile(keras.optimizers.Adam(settings["image_lr"]),
                  keras.optimizers.SGD(settings["sampler_lr"]), jit_compile=False)
    return model


@pytest.fixture(scope="module")
def real_batch(small_fashion_mnist):
    return next(iter(nk.class_balanced_batches(small_fashion_mnist, 8)))


def test_blending_endpoints_reproduce_init_and_trained(small_fashion_mnist):
    d = small_fashion_mnist
    model = _model(d)
    initial, trained = _pool(d)
    x = nk.to_float(d.x_test[:4])
    for lam, weights in ((1.0, initial[1]), (0.0, trained[1])):
        blended, _ = model.blend(1, lam)
        features, logits = model._extract(blended, x)
        net = nk.build_network("convnet", d.image_shape, d.num_classes, d.mean, d.std)
        net.set_weights(weights)
        np.testing.assert_allclose(logits, net(x), rtol=1e-4, atol=1e-4)


def test_psi_ascends_and_images_descend(small_fashion_mnist, real_batch):
    seed = tf.constant([3, 4])
    model = _model(small_fashion_mnist, calibration=0.0, image_lr=1e-12)
    before = float(model.matching_loss(real_batch, seed))
    model.train_step(real_batch, seed)
    assert float(model.matching_loss(real_batch, seed)) > before  # psi maximises

    model = _model(small_fashion_mnist, calibration=0.0, sampler_lr=1e-12, image_lr=0.01)
    before = float(model.matching_loss(real_batch, seed))
    model.train_step(real_batch, seed)
    assert float(model.matching_loss(real_batch, seed)) < before  # the images minimise


def test_each_update_changes_only_its_own_variables(small_fashion_mnist, real_batch):
    model = _model(small_fashion_mnist)
    sampler_weights = [v.numpy() for v in model.sampler.trainable_variables]
    extractor_weights = [v.numpy() for v in model.extractor.weights]
    images = model.synthetic.numpy()
    logs = model.train_step(real_batch)
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert not np.allclose(model.synthetic.numpy(), images)
    assert all(not np.allclose(a, v.numpy()) for a, v in
               zip(sampler_weights, model.sampler.trainable_variables))
    for a, v in zip(extractor_weights, model.extractor.weights):
        np.testing.assert_array_equal(a, v.numpy())
    assert 0 <= model.synthetic.numpy().min() and model.synthetic.numpy().max() <= 1
    # The image optimizer tracks the pixels only; the sampler optimizer psi only.
    assert {v.path for v in model.optimizer._trainable_variables} == {model.synthetic.path}
    assert model.synthetic.path not in {v.path for v in
                                        model.sampler_optimizer._trainable_variables}


def test_without_psi_and_with_mmd(small_fashion_mnist, real_batch):
    plain = _model(small_fashion_mnist, sampling_net=False)
    assert plain.sampler is None and np.isfinite(float(plain.train_step(real_batch)[
        "matching_loss"]))
    mmd = _model(small_fashion_mnist, loss="mmd")
    assert mmd.sampler is None and np.isfinite(float(mmd.train_step(real_batch)[
        "matching_loss"]))


def test_fit_under_xla(small_fashion_mnist):
    model = _model(small_fashion_mnist)
    model.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.01), jit_compile=True)
    history = model.fit(nk.class_balanced_batches(small_fashion_mnist, 8), steps_per_epoch=2,
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["matching_loss"][-1])


def test_float16_policy_stays_finite(small_fashion_mnist, real_batch):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(small_fashion_mnist)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.sampler_optimizer, keras.optimizers.LossScaleOptimizer)
        images = model.synthetic.numpy()
        for _ in range(3):  # the first steps may overflow at the initial loss scale: skipped
            logs = model.train_step(real_batch)
        assert all(np.isfinite(float(v)) for v in logs.values()), logs
        assert not np.array_equal(model.synthetic.numpy(), images)
        assert model.synthetic.dtype == "float32"
        assert np.all(np.isfinite(model.synthetic.numpy()))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_class_groups_do_not_change_the_loss(small_fashion_mnist, real_batch):
    seed = tf.constant([5, 6])
    losses = [float(_model(small_fashion_mnist, class_group=g, sampling_net=False)
                    .matching_loss(real_batch, seed))
              for g in (1, 4, 10)]  # 4 does not divide 10: groups of 2
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


def _class_mask(model, c):
    """1 on the stored pixels of class c, 0 elsewhere."""
    mask = np.zeros(model.synthetic.shape, np.float32)
    ipc = model.config.ipc
    mask[c * ipc:(c + 1) * ipc] = 1
    return mask


def test_summed_step_is_one_step_on_the_gradient_of_the_summed_loss(small_fashion_mnist,
                                                                    real_batch):
    """Class groups compute the gradient one group at a time; a summed step applies the
    gradient of the loss of all classes at once."""
    seed = tf.constant([7, 8])
    for group in (1, 5):
        model = _model(small_fashion_mnist, class_group=group, sampling_net=False,
                       calibration=0.0, image_steps="summed")
        model.compile(keras.optimizers.SGD(1e-3), jit_compile=False)
        with tf.GradientTape() as tape:  # autodiff through the whole set at once
            whole = model.matching_loss(real_batch, seed)
        gradient = tape.gradient(whole, model.synthetic).numpy()
        expected = np.clip(model.synthetic.numpy() - 1e-3 * gradient, 0, 1)
        logs = model.train_step(real_batch, seed)
        np.testing.assert_allclose(float(logs["matching_loss"]), float(whole), rtol=1e-5)
        assert np.abs(gradient).max() > 0
        # Equal up to float32 rounding, which the CF loss's square roots amplify where a
        # frequency's discrepancy is near zero: compare whole updates, not single pixels.
        before = expected + 1e-3 * gradient
        error = (np.linalg.norm(model.synthetic.numpy() - expected) /
                 np.linalg.norm(expected - before))
        assert error < 1e-3, (group, error)


@pytest.mark.parametrize("jit", [False, True])
def test_per_class_step_is_k_sequential_optimizer_steps(small_fashion_mnist, real_batch, jit):
    """The compiled per-class step equals K eager AdamW steps, each on one class's gradient
    taken at the pixels the previous steps left (the official code's loop)."""
    seed = tf.constant([3, 9])
    settings = dict(sampling_net=False, calibration=0.0, image_steps="per_class")
    reference = _model(small_fashion_mnist, **settings)
    optimizer = keras.optimizers.AdamW(0.01, weight_decay=5e-4)
    optimizer.build([reference.synthetic])

    @tf.function(jit_compile=jit)  # XLA draws other random numbers than TF's kernels
    def whole_gradient():
        with tf.GradientTape() as tape:
            loss = reference.matching_loss(real_batch, seed)
        return tape.gradient(loss, reference.synthetic)

    for c in range(small_fashion_mnist.num_classes):
        # Classes are independent: the part of the whole gradient on class c's pixels is
        # the gradient of class c's loss.
        gradient = whole_gradient() * _class_mask(reference, c)
        optimizer.apply([gradient], [reference.synthetic])
    expected = np.clip(reference.synthetic.numpy(), 0, 1)

    model = _model(small_fashion_mnist, **settings)
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=5e-4), jit_compile=jit)
    before = model.synthetic.numpy()
    tf.function(model.train_step, jit_compile=jit)(real_batch, seed)
    assert int(model.optimizer.iterations.numpy()) == small_fashion_mnist.num_classes
    moved = np.abs(expected - before).max()
    assert moved > 0.02  # ten Adam steps of lr 0.01 moved the pixels ...
    difference = np.abs(model.synthetic.numpy() - expected)
    # ... as the eager loop did, up to float32 rounding: Adam's g / (|g| + eps) shows it
    # where a gradient is near eps, so allow a fraction of one step (lr 0.01) on a few pixels.
    assert difference.max() < 5e-3 and np.mean(difference > 1e-5) < 1e-2, (
        difference.max(), np.mean(difference > 1e-5))
    # One step on the summed loss moves the pixels less (here: K times less per pixel).
    summed = _model(small_fashion_mnist, **{**settings, "image_steps": "summed"})
    summed.compile(keras.optimizers.AdamW(0.01, weight_decay=5e-4), jit_compile=False)
    summed.train_step(real_batch, seed)
    assert np.abs(summed.synthetic.numpy() - before).max() < 0.5 * moved


def test_calibration_is_the_mean_cross_entropy_of_each_class(small_fashion_mnist, real_batch):
    """Calibration loss = calibration x sum over classes of the trained member's mean
    cross-entropy on the class's decoded images (the official per-class loss), its DSA one draw
    for all of a class's images (official) or one per image. Computed here from the public
    pieces only: a one-member pool (so the member is known), the stored images decoded with
    `nk.decode`, the calibration seed as `_draw` documents it (the 4th of `split_seed(seed, 4)`),
    and a Keras network holding the member's trained weights; image_lr ~ 0 so the pixels stay
    put across the loop."""
    d = small_fashion_mnist
    initial, trained = _pool(d, members=1)
    teacher = nk.build_network("convnet", d.image_shape, d.num_classes, d.mean, d.std)
    teacher.set_weights(trained[0])
    seed = tf.constant([1, 2])
    calibration_seed = nk.split_seed(seed, 4)[3]
    for augment in ("per_class", "per_sample"):
        config = nk.DistillConfig(ipc=1, factor=2, batch_real=8, num_freqs=64, num_pretrained=1,
                                  pretrain_epochs=0, sampling_net=False, calibration=2.0,
                                  calibration_augment=augment)
        model = nk.NCFM(d, config, (initial, trained))
        model.compile(keras.optimizers.Adam(1e-12), jit_compile=False)
        decoded = tf.reshape(nk.decode(tf.constant(model.synthetic.numpy()), 2),
                             [10, 4, 28, 28, 1])
        logs = model.train_step(real_batch, seed)
        expected = 0.0
        for c in range(10):
            class_seed = tf.random.experimental.stateless_fold_in(calibration_seed, c, nk.RNG)
            if augment == "per_class":  # one draw, one row: all four images of the class
                params = nk.dsa_parameters(class_seed, 1, (28, 28), config.augment)
                images = nk.dsa_apply(decoded[c][None], params, mean=d.mean, std=d.std)[0]
            else:
                params = nk.dsa_parameters(class_seed, 4, (28, 28), config.augment)
                images = nk.dsa_apply(decoded[c], params, mean=d.mean, std=d.std)
            cross_entropy = keras.losses.sparse_categorical_crossentropy(
                np.full(4, c), teacher(images), from_logits=True)
            expected += 2.0 * float(tf.reduce_mean(cross_entropy))
        np.testing.assert_allclose(float(logs["calibration_loss"]), expected, rtol=1e-4)


def test_frequencies_are_drawn_per_class_or_once(small_fashion_mnist):
    model = _model(small_fashion_mnist, sampling_net=False, frequency_draw="per_class")
    seed = tf.constant([4, 4])
    per_class = model._class_frequencies(seed, tf.constant([0, 1, 0]))
    assert per_class.shape == (3, 64, 2048)
    assert not np.allclose(per_class[0], per_class[1])
    np.testing.assert_array_equal(per_class[0], per_class[2])  # a class's draw: (seed, class)
    assert model._plain_frequencies(seed) is None  # per_class draws inside each class's loss
    for once in ("class_views", "per_iteration"):
        shared = _model(small_fashion_mnist, sampling_net=False, frequency_draw=once)
        assert shared._plain_frequencies(seed).shape == (64, 2048)
    assert _model(small_fashion_mnist)._plain_frequencies(seed) is None  # psi draws its own


def test_class_views_are_signed_permutations(small_fashion_mnist):
    """class_views: class c's features are matched as x P_c, P_c a signed permutation that is
    a function of (seed, class)."""
    model = _model(small_fashion_mnist, sampling_net=False, frequency_draw="class_views")
    seed = tf.constant([4, 4])
    identity = tf.eye(2048)[None]
    views = [model._class_view(identity, seed, tf.constant([c]))[0].numpy() for c in (0, 1, 0)]
    for view in views:  # one +-1 in each row and column
        assert set(np.unique(view)) == {-1.0, 0.0, 1.0}
        np.testing.assert_array_equal(np.abs(view).sum(0), 1.0)
        np.testing.assert_array_equal(np.abs(view).sum(1), 1.0)
    assert not np.array_equal(np.abs(views[0]), np.eye(2048))  # the columns do move
    assert not np.array_equal(views[0], views[1])
    np.testing.assert_array_equal(views[0], views[2])
    features = tf.random.stateless_normal([2, 5, 2048], [1, 2])  # two classes at once
    viewed = model._class_view(features, seed, tf.constant([0, 1]))
    for c in (0, 1):
        np.testing.assert_array_equal(viewed[c], features[c].numpy() @ views[c])


def test_each_frequency_draw_is_the_cf_at_its_frequencies(small_fashion_mnist, real_batch):
    """The matching loss without psi is, per class, the CF loss (the numpy reference) of the
    real and synthetic features at: the class's own draw (per_class), t P_c^T (class_views: so
    both sides see the same P_c), or one t (per_iteration)."""
    seed = tf.constant([5, 6])
    classes = tf.range(10)
    for draw_mode in ("per_class", "class_views", "per_iteration"):
        model = _model(small_fashion_mnist, sampling_net=False, frequency_draw=draw_mode)
        draw = model._draw(seed, classes)
        real = model._real_features(real_batch, draw).numpy()
        syn = model._synthetic_features(draw, classes).numpy()
        expected = 0.0
        for c in range(10):
            if draw_mode == "per_class":
                frequencies = model._class_frequencies(draw.frequency_seed,
                                                       tf.constant([c]))[0].numpy()
            else:
                frequencies = model._plain_frequencies(draw.frequency_seed).numpy()
            if draw_mode == "class_views":
                view = model._class_view(tf.eye(2048)[None], draw.frequency_seed,
                                         tf.constant([c]))[0].numpy()
                frequencies = frequencies @ view.T
            expected += reference_cf_loss(real[c], syn[c], frequencies)
        np.testing.assert_allclose(float(model.matching_loss(real_batch, seed)),
                                   model.config.match_scale * expected, rtol=1e-4)


def test_plateau_halves_the_learning_rate_and_resumes(small_fashion_mnist):
    """torch's ReduceLROnPlateau as the official code uses it: relative threshold 1e-4,
    halve after more than `lr_patience` iterations without improvement."""
    model = _model(small_fashion_mnist, lr_patience=2)
    rates = []
    for loss in (10.0, 9.9995, 9.9995, 9.9995, 9.0, 9.0, 9.0, 9.0):
        model._plateau(tf.constant(loss))
        rates.append(float(model.optimizer.learning_rate.numpy()))
    # 9.9995 is not 1e-4 below 10: no improvement; the third such iteration halves.
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.0025])
    resumed = _model(small_fashion_mnist, lr_patience=2)
    runs.set_state(resumed, runs.get_state(model))
    np.testing.assert_allclose(float(resumed.optimizer.learning_rate.numpy()), 0.0025)
    assert int(resumed.plateau_wait.numpy()) == 0 and float(resumed.plateau_best.numpy()) == 9.0


def test_state_round_trip_continues_identically(small_fashion_mnist, real_batch):
    model = _model(small_fashion_mnist)
    for _ in range(2):
        model.train_step(real_batch)
    state = runs.get_state(model)
    assert {"synthetic", "iteration", "plateau_best", "plateau_wait", "sampler/000",
            "sampler_optimizer/000", "image_optimizer/000"} <= set(state)
    resumed = _model(small_fashion_mnist)
    runs.set_state(resumed, state)
    for m in (model, resumed):
        m.train_step(real_batch)
    np.testing.assert_array_equal(model.synthetic.numpy(), resumed.synthetic.numpy())
    for a, b in zip(model.sampler.weights, resumed.sampler.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(nk.NCFMError, match="does not fit"):
        runs.set_state(_model(small_fashion_mnist, sampling_net=False), state)


def test_nonfinite_updates_never_reach_the_images(small_fashion_mnist, real_batch):
    model = _model(small_fashion_mnist, calibration=0.0)
    model.train_step(real_batch)  # builds psi
    for v in model.sampler.trainable_variables[:1]:
        v.assign(np.full(v.shape, np.nan, np.float32))  # psi now emits NaN frequencies
    images = model.synthetic.numpy()
    logs = model.train_step(real_batch)
    assert not np.isfinite(float(logs["matching_loss"]))
    assert float(logs["nonfinite_steps"]) >= 1
    np.testing.assert_array_equal(model.synthetic.numpy(), images)  # the step was skipped
