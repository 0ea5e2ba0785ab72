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
