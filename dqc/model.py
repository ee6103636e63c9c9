"""The SFCN-like 3D CNN of the paper: an encoder and a one-unit sigmoid classifier.

The encoder and the classifier are two Keras models (the authors save them as two files per
cycle); training uses the two stacked as one model with one Adam optimizer, which is
mathematically the same as the authors' one Adam per part.
"""

from __future__ import annotations

import keras
from keras import layers

DEFAULT_SHAPE = (160, 192, 160)
FILTERS = (32, 64, 128, 256, 256)


def build_encoder(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> keras.Model:
    """Five Conv3D-BN-MaxPool-ReLU blocks, a 1x1x1 Conv3D(64)-BN-ReLU, AvgPool, Dropout, Flatten.

    The final 2x2x2 average pool uses `valid` padding as in the original; only for inputs so
    small that the feature map has a side shorter than 2 (below 33 voxels) it pads (`same`),
    otherwise the output would be empty. Tests use such tiny volumes.
    """
    inputs = keras.Input((*shape, 1), name="image")
    x = inputs
    for i, filters in enumerate(FILTERS):
        x = layers.Conv3D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.MaxPooling3D(2, strides=2, padding="same", name=f"pool{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.Conv3D(64, 1, padding="same", name="conv_out")(x)
    x = layers.BatchNormalization(name="bn_out")(x)
    x = layers.ReLU(name="relu_out")(x)
    pad = "valid" if min(x.shape[1:4]) >= 2 else "same"
    x = layers.AveragePooling3D(2, padding=pad, name="avgpool")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, x, name="encoder")


def build_classifier(features: int) -> keras.Model:
    """Dense(1, sigmoid) on the encoder output: the probability of PD.

    The output layer always computes in float32, so that under mixed precision the
    probabilities and the loss keep full precision (the usual Keras practice).
    """
    inputs = keras.Input((features,), name="features")
    head = layers.Dense(1, activation="sigmoid", dtype="float32", name="pd")
    return keras.Model(inputs, head(inputs), name="classifier")


def build_models(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> tuple[keras.Model, keras.Model]:
    """A fresh (encoder, classifier) pair for (x, y, z) volumes of `shape`."""
    encoder = build_encoder(shape)
    return encoder, build_classifier(int(encoder.output.shape[-1]))


def stack(encoder: keras.Model, classifier: keras.Model) -> keras.Model:
    """The end-to-end model image -> P(PD) that shares its layers with both parts."""
    inputs = keras.Input(encoder.input.shape[1:], name="image")
    return keras.Model(inputs, classifier(encoder(inputs)), name="sfcn")


def input_shape(encoder: keras.Model) -> tuple[int, int, int]:
    """The (x, y, z) volume shape an encoder takes."""
    return tuple(int(s) for s in encoder.input.shape[1:4])  # type: ignore[return-value]


def in_current_precision(encoder: keras.Model,
                         classifier: keras.Model) -> tuple[keras.Model, keras.Model]:
    """The same weights in models built under the global dtype policy (float32 or mixed).

    A saved model keeps the policy it was trained with; a run that asks for another one
    rebuilds the layers and copies the weights.
    """
    # a loaded model takes the global policy, its layers keep the one they were saved with
    if encoder.get_layer("conv0").dtype_policy.name == keras.config.dtype_policy().name:
        return encoder, classifier
    new_encoder, new_classifier = build_models(input_shape(encoder))
    new_encoder.set_weights(encoder.get_weights())
    new_classifier.set_weights(classifier.get_weights())
    return new_encoder, new_classifier
