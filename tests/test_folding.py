"""Prediction with BatchNormalization folded into the convolutions (dqc.folding): the same
scores as the layers as trained, after every training step, or no folding at all."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dqc.folding import fold
from dqc.model import Architecture, build_models, stack
from dqc.trainer import Trainer, predict_in_batches

SHAPE = (16, 20, 16)


def _trained_looking_statistics(encoder: keras.Model, seed: int = 1) -> None:
    """BatchNorm statistics and affine weights far from their initial 0/1, so that a fold that
    left one out (or used stale values) would move the scores."""
    rng = np.random.default_rng(seed)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n))
            layer.beta.assign(rng.normal(0, 0.3, n))


def _volumes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE, 1)).astype(np.uint8)


@pytest.mark.jax
@pytest.mark.parametrize("intensity", ["raw", "zscore"])
def test_folded_scores_are_the_layers_scores_to_rounding(intensity):
    encoder, classifier = build_models(SHAPE, Architecture(width=0.25, intensity=intensity))
    _trained_looking_statistics(encoder)
    x = _volumes(7)
    features = np.asarray(encoder.predict_on_batch(x))  # logits spread ~1: scores far from 0, 1
    head = classifier.get_layer("pd")
    head.kernel.assign(np.random.default_rng(3).normal(size=head.kernel.shape)
                       / (features.std(axis=0).mean() * np.sqrt(features.shape[1]) + 1e-12))
    head.bias.assign(-np.mean(features @ np.asarray(head.kernel), keepdims=True)[0])
    folded = fold(encoder, classifier)
    layers = predict_in_batches(stack(encoder, classifier), x, 4)
    assert len(folded.pairs) == 6  # five blocks and the 1x1x1 convolution
    assert not any(isinstance(s, keras.layers.BatchNormalization) for s in folded.steps)
    assert np.ptp(layers) > 0.05  # scores spread: a wrong fold would show
    # the head amplifies the features' float rounding (measured up to 1.1e-5 here); a fold
    # that drops a BN term moves scores by tenths
    np.testing.assert_allclose(predict_in_batches(folded, x, 4), layers, atol=1e-4)


@pytest.mark.jax
def test_the_trainer_predicts_with_the_weights_of_its_last_step():
    encoder, classifier = build_models(SHAPE, Architecture(width=0.25))
    trainer = Trainer(encoder, classifier)
    assert trainer.folded is not None
    x, y = _volumes(6, seed=2), np.array([0, 1, 0, 1, 0, 1], np.float32)
    saved, before = trainer.snapshot(), trainer.predict(x)
    for _ in range(3):  # moves the BN statistics and every weight
        trainer.train_step(x.astype(np.float32), y)
    after = trainer.predict(x)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, predict_in_batches(trainer.model, x, 4), atol=2e-6)
    trainer.restore(saved)  # an undo is followed too
    np.testing.assert_array_equal(trainer.predict(x), before)
    unfolded = Trainer(*build_models(SHAPE, Architecture(width=0.25)), fold_batchnorm=False)
    assert unfolded.folded is None


def test_a_model_that_is_not_one_chain_is_predicted_as_it_is():
    inputs = keras.Input((*SHAPE, 1))
    a = keras.layers.Conv3D(2, 3, padding="same")(inputs)
    b = keras.layers.BatchNormalization()(a)
    merged = keras.layers.Add()([a, b])  # a branch: no Conv3D -> BN chain to fold
    encoder = keras.Model(inputs, keras.layers.Flatten()(merged))
    classifier = keras.Sequential([keras.Input((int(encoder.output.shape[-1]),)),
                                   keras.layers.Dense(1, activation="sigmoid")])
    assert fold(encoder, classifier) is None
