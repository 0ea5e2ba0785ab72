import keras
import numpy as np
import pytest

import ncfm_keras as nk


@pytest.mark.parametrize("arch,features", [("convnet", 2048), ("alexnet", 3072),
                                           ("vgg11", 512), ("resnet18", 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(arch, features, channels):
    model = nk.build_network(arch, (32, 32, channels), 7, [0.5] * channels, [0.25] * channels)
    both = nk.with_features(model)
    x = np.random.default_rng(0).random((2, 32, 32, channels), np.float32)
    feats, logits = both(x)
    assert feats.shape == (2, features) and logits.shape == (2, 7)
    np.testing.assert_allclose(model(x), logits, rtol=1e-5, atol=1e-5)  # shared weights
    for layer in model.layers:  # torch's default initialisation in every architecture
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            bound = 1 / np.sqrt(np.prod(layer.kernel.shape[:-1]))  # float32 rounding below
            largest = np.abs(layer.kernel.numpy()).max()
            assert 0.9 * bound < largest <= bound * (1 + 1e-6), layer.name


def test_convnet_depth_follows_resolution():
    assert [nk.convnet_depth(s) for s in (32, 64, 128)] == [3, 4, 5]
    model = nk.build_network("convnet", (64, 64, 3), 10, [0.5] * 3, [0.2] * 3)
    assert model.get_layer("features").output.shape[-1] == 128 * 4 * 4


def test_normalisation_is_inside_the_model():
    model = nk.build_network("convnet", (32, 32, 1), 2, [0.3], [0.2])
    normaliser = model.layers[1]
    np.testing.assert_allclose(normaliser(np.full((1, 2, 2, 1), 0.5, np.float32)), 1.0,
                               rtol=1e-5)


def test_unknown_architecture():
    with pytest.raises(nk.NCFMError, match="unknown architecture 'lenet'"):
        nk.build_network("lenet", (32, 32, 1), 2, [0.3], [0.2])


def test_weights_start_as_torch_defaults():
    """Conv / dense kernels and biases uniform in ±1/√fan_in, norm layers gamma 1, beta 0."""
    model = nk.build_network("convnet", (32, 32, 3), 10, [0.5] * 3, [0.25] * 3, seed=0)
    checked = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel, bias = (w.numpy() for w in (layer.kernel, layer.bias))
            bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))  # fan_in: all but the output axis
            for w in (kernel, bias):
                assert np.abs(w).max() <= bound * (1 + 1e-6), layer.name  # float32
                if w.size >= 100:  # U(±b): the extremes reach b, the std is b/√3
                    assert np.abs(w).max() > 0.95 * bound, layer.name
                    assert abs(w.mean()) < 0.25 * bound and 0.5 < w.std() / bound < 0.65
            checked += 1
        elif isinstance(layer, keras.layers.GroupNormalization):
            assert np.all(layer.gamma.numpy() == 1) and np.all(layer.beta.numpy() == 0)
    assert checked == 4  # three convs and the classifier
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert not np.allclose(convs[1].kernel.numpy(), convs[2].kernel.numpy())  # own draws


def test_initial_weights_are_a_function_of_the_seed_alone():
    def weights(seed):
        return nk.build_network("convnet", (28, 28, 1), 10, [0.3], [0.2], seed=seed).get_weights()

    first = weights(0)
    keras.utils.set_random_seed(123)  # the global seed plays no part
    assert all(np.array_equal(a, b) for a, b in zip(first, weights(0)))
    assert not np.allclose(first[0], weights(1)[0])
    sampler = [nk.SamplingNet(16, 32, seed=s).get_weights() for s in (5, 5, 6)]
    assert all(np.array_equal(a, b) for a, b in zip(sampler[0], sampler[1]))
    assert not np.allclose(sampler[0][0], sampler[2][0])


def test_coupled_sgd_follows_the_torch_formula():
    lr, momentum, wd = 0.1, 0.9, 0.05
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    grads = [np.array([0.3, 0.1, -0.2], np.float32), np.array([-0.4, 0.2, 0.6], np.float32)]
    variable = keras.Variable(w0)
    optimizer = nk.CoupledSGD(lr, momentum=momentum, coupled_weight_decay=wd)
    w, v = w0.astype(np.float64), np.zeros(3)
    for g in grads:  # torch.optim.SGD: v = mu v + g + wd w; w -= lr v
        optimizer.apply([g], [variable])
        v = momentum * v + g + wd * w
        w = w - lr * v
        np.testing.assert_allclose(variable.numpy(), w, rtol=1e-6)
    # Keras' decoupled weight_decay would land elsewhere.
    keras_variable = keras.Variable(w0)
    keras_sgd = keras.optimizers.SGD(lr, momentum=momentum, weight_decay=wd)
    for g in grads:
        keras_sgd.apply([g], [keras_variable])
    assert not np.allclose(keras_variable.numpy(), w, rtol=1e-4)


def test_sgd_protocols_use_coupled_weight_decay():
    for name in ("dm", "pretrain"):
        optimizer = nk._evaluation_optimizer(nk.PROTOCOLS[name], 100)
        assert isinstance(optimizer, nk.CoupledSGD) and optimizer.weight_decay is None
        assert optimizer.coupled_weight_decay == nk.PROTOCOLS[name].weight_decay == 5e-4


def test_28x28_networks_pad_with_the_mean_colour_inside():
    """A 28x28 network is the 32x32 one (same weights) on the image framed by 2 mean-coloured
    pixels: the official first convolution's padding of 3 after normalisation."""
    mean, std = [0.3], [0.2]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    framed = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=0.3)
    for arch in ("convnet", "alexnet", "vgg11"):
        small = nk.build_network(arch, (28, 28, 1), 10, mean, std)
        large = nk.build_network(arch, (32, 32, 1), 10, mean, std)
        large.set_weights(small.get_weights())
        np.testing.assert_allclose(small(x), large(framed), rtol=1e-4, atol=1e-5)
    assert nk.with_features(small).outputs[0].shape[-1] == 512  # VGG's 512 x 1 x 1
    convnet = nk.build_network("convnet", (28, 28, 1), 10, mean, std)
    assert nk.with_features(convnet).outputs[0].shape[-1] == 2048  # CIFAR's 128 x 4 x 4
    resnet = nk.build_network("resnet18", (28, 28, 1), 10, mean, std)  # takes 28x28 as is
    assert not any(isinstance(layer, keras.layers.ZeroPadding2D) for layer in resnet.layers)
