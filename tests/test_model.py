"""The SFCN-like encoder and the classifier: layer order, sizes and parameter counts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dqc.model import (DEFAULT_SHAPE, FILTERS, Architecture, architecture, build_classifier,
                       build_encoder, build_models, in_current_precision, input_shape, stack)

BLOCK = ["Conv3D", "BatchNormalization", "MaxPooling3D", "ReLU"]
LAYERS = BLOCK * 5 + ["Conv3D", "BatchNormalization", "ReLU", "AveragePooling3D", "Dropout",
                      "Flatten"]


def expected_encoder_parameters(width: float = 1.0) -> int:
    """Conv k^3 * c_in * c_out + c_out; BatchNorm 4 * c (gamma, beta, moving mean, variance).

    At width w every filter count c becomes w * c."""
    total, c_in = 0, 1
    for c_out in (32, 64, 128, 256, 256):
        c_out = int(c_out * width)
        total += 3**3 * c_in * c_out + c_out + 4 * c_out
        c_in = c_out
    out = int(64 * width)
    total += 1**3 * c_in * out + out + 4 * out
    return total


def test_full_size_encoder_gives_768_features_and_the_expected_parameter_count():
    keras.utils.set_random_seed(0)
    encoder, classifier = build_models(DEFAULT_SHAPE)  # built, never run: 160x192x160 is big
    assert input_shape(encoder) == (160, 192, 160)
    # five stride-2 `same` pools: 160 -> 5, 192 -> 6; then a 2x2x2 `valid` average pool
    assert tuple(encoder.get_layer("relu_out").output.shape[1:]) == (5, 6, 5, 64)
    assert tuple(encoder.output.shape[1:]) == (768,)
    assert 768 == 2 * 3 * 2 * 64
    assert encoder.count_params() == expected_encoder_parameters() == 2_951_936
    assert tuple(classifier.input.shape[1:]) == (768,)
    assert classifier.count_params() == 768 + 1
    assert stack(encoder, classifier).count_params() == 2_951_936 + 769


def test_small_encoder_gives_64_features_and_the_same_encoder_parameters():
    encoder, classifier = build_models((20, 24, 20))
    assert input_shape(encoder) == (20, 24, 20)
    # 20 -> 10 -> 5 -> 3 -> 2 -> 1: a 1x1x1 map, which the average pool keeps (`same`)
    assert tuple(encoder.output.shape[1:]) == (64,)
    assert encoder.count_params() == expected_encoder_parameters()
    assert classifier.count_params() == 64 + 1


def test_layer_order_and_settings_follow_the_paper():
    encoder = build_encoder((20, 24, 20))
    layers = encoder.layers[1:]  # after the input
    assert [type(layer).__name__ for layer in layers] == LAYERS
    convs = [layer for layer in layers if type(layer).__name__ == "Conv3D"]
    assert [c.filters for c in convs] == [*FILTERS, 64] == [32, 64, 128, 256, 256, 64]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 5 + [(1, 1, 1)]
    assert all(c.padding == "same" for c in convs)
    pools = [layer for layer in layers if type(layer).__name__ == "MaxPooling3D"]
    assert all(p.pool_size == (2, 2, 2) and p.strides == (2, 2, 2) and p.padding == "same"
               for p in pools)
    assert encoder.get_layer("dropout").rate == pytest.approx(0.2)
    dense = build_classifier(64).get_layer("pd")
    assert dense.units == 1
    assert dense.activation is keras.activations.sigmoid


def test_classifier_outputs_are_probabilities():
    keras.utils.set_random_seed(1)
    encoder, classifier = build_models((20, 24, 20))
    model = stack(encoder, classifier)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 300.0, size=(4, 20, 24, 20, 1)).astype(np.float32)
    p = np.asarray(model.predict_on_batch(x))
    assert p.shape == (4, 1)
    assert np.all((p >= 0.0) & (p <= 1.0))
    # the head alone, on extreme features: saturates at, never beyond, 0 and 1
    features = np.concatenate([np.full((1, 64), -1e4), np.full((1, 64), 1e4),
                               rng.normal(0, 1, (6, 64))]).astype(np.float32)
    classifier.get_layer("pd").set_weights([np.ones((64, 1), np.float32),
                                            np.zeros(1, np.float32)])
    q = np.asarray(classifier.predict_on_batch(features)).reshape(-1)
    assert np.all((q >= 0.0) & (q <= 1.0))
    assert q[0] == pytest.approx(0.0, abs=1e-6) and q[1] == pytest.approx(1.0, abs=1e-6)
    expected = 1.0 / (1.0 + np.exp(-features[2:].sum(axis=1)))
    assert np.allclose(q[2:], expected, atol=1e-5)


@pytest.mark.parametrize("width", [0.25, 0.5])
def test_width_scales_every_filter_count_as_the_formula_says(width):
    encoder, classifier = build_models((40, 48, 40), Architecture(width=width))
    convs = [layer.filters for layer in encoder.layers if type(layer).__name__ == "Conv3D"]
    assert convs == [int(c * width) for c in (*FILTERS, 64)]
    assert encoder.count_params() == expected_encoder_parameters(width)
    # by hand: 512 + 13,984 + 55,616 + 221,824 + 443,008 + 4,256 (filters 16..128, out 32)
    assert expected_encoder_parameters(0.5) == 739_200
    assert tuple(encoder.output.shape[1:]) == (int(64 * width) * 1 * 1 * 1,)
    assert classifier.count_params() == int(64 * width) + 1
    assert architecture(encoder) == Architecture(width=width)


def test_default_architecture_is_the_papers_model_and_bad_settings_are_refused():
    assert build_encoder((20, 24, 20)).count_params() == expected_encoder_parameters(1.0)
    assert Architecture() == Architecture(width=1.0, intensity="raw")
    with pytest.raises(ValueError, match="multiple of 1/32"):
        Architecture(width=0.3)
    with pytest.raises(ValueError, match="intensity"):
        Architecture(intensity="minmax")


def test_zscore_model_standardises_each_volume_and_sees_inversion_as_negation(tmp_path):
    keras.utils.set_random_seed(3)
    encoder, classifier = build_models((20, 24, 20), Architecture(intensity="zscore"))
    layer = encoder.get_layer("standardize")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 20, 24, 20, 1)).astype(np.float32)
    z = np.asarray(layer(x))
    assert np.allclose(z.mean(axis=(1, 2, 3, 4)), 0.0, atol=1e-4)
    assert np.allclose(z.std(axis=(1, 2, 3, 4)), 1.0, atol=1e-4)
    assert np.allclose(np.asarray(layer(255.0 - x)), -z, atol=1e-4)
    assert np.allclose(np.asarray(layer(3.0 * x + 7.0)), z, atol=1e-4)  # scanner gain/offset
    # saved and loaded, the model keeps its preprocessing and its predictions
    model = stack(encoder, classifier)
    path = tmp_path / "enc.keras"
    encoder.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert architecture(loaded) == Architecture(intensity="zscore")
    assert np.allclose(np.asarray(loaded.predict_on_batch(x)),
                       np.asarray(encoder.predict_on_batch(x)), atol=1e-5)
    rebuilt_encoder, _ = in_current_precision(loaded, classifier)
    assert architecture(rebuilt_encoder).intensity == "zscore"
    assert model.count_params() == stack(loaded, classifier).count_params()
