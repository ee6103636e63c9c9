"""The SFCN-like 3D CNN of the paper: an encoder and a one-unit sigmoid classifier.

The encoder and the classifier are two Keras models (the authors save them as two files per
cycle); training uses the two stacked as one model with one Adam optimizer, which is
mathematically the same as the authors' one Adam per part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers, ops

DEFAULT_SHAPE = (160, 192, 160)
FILTERS = (32, 64, 128, 256, 256)
OUT_FILTERS = 64
INTENSITIES = ("raw", "zscore")


@dataclass(frozen=True)
class Architecture:
    """What a saved model must be rebuilt with: filter width and input intensity handling.

    width scales every filter count (1 = the paper's SFCN); intensity `raw` feeds the voxel
    values as they are (the authors' way), `zscore` standardises each volume to mean 0, sd 1
    inside the model, so training, validation and inference all see the same preprocessing.
    """

    width: float = 1.0
    intensity: str = "raw"

    def __post_init__(self):
        if self.width <= 0 or abs(self.width * FILTERS[0] - round(self.width * FILTERS[0])) > 1e-9:
            raise ValueError(f"width must be a positive multiple of 1/{FILTERS[0]} (e.g. 0.25, "
                             f"0.5, 1), got {self.width}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, "
                             f"got {self.intensity!r}")

    def filters(self) -> tuple[tuple[int, ...], int]:
        """(block filters, 1x1x1 output filters) at this width."""
        return tuple(round(f * self.width) for f in FILTERS), round(OUT_FILTERS * self.width)

    def as_dict(self) -> dict:
        return asdict(self)


@keras.saving.register_keras_serializable(package="dqc")
class PerImageStandardization(layers.Layer):
    """(x - mean) / sd over each volume's voxels: per-image intensity standardisation.

    Inside the model so that a saved model carries its preprocessing. An inverted volume
    (max - x) becomes exactly the negative of the original's standardised volume.
    """

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        axes = tuple(range(1, len(x.shape)))
        mean = ops.mean(x, axis=axes, keepdims=True)
        sd = ops.sqrt(ops.mean(ops.square(x - mean), axis=axes, keepdims=True))
        return (x - mean) / (sd + 1e-6)


def build_encoder(shape: tuple[int, int, int] = DEFAULT_SHAPE,
                  arch: Architecture = Architecture()) -> keras.Model:
    """Five Conv3D-BN-MaxPool-ReLU blocks, a 1x1x1 Conv3D(64)-BN-ReLU, AvgPool, Dropout, Flatten.

    `arch` scales the filter counts and may put per-image standardisation first; the default
    is the paper's model exactly.

    The final 2x2x2 average pool uses `valid` padding as in the original; only for inputs so
    small that the feature map has a side shorter than 2 (below 33 voxels) it pads (`same`),
    otherwise the output would be empty. Tests use such tiny volumes.
    """
    blocks, out_filters = arch.filters()
    inputs = keras.Input((*shape, 1), name="image")
    x = PerImageStandardization(name="standardize")(inputs) if arch.intensity == "zscore" \
        else inputs
    for i, filters in enumerate(blocks):
        x = layers.Conv3D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.MaxPooling3D(2, strides=2, padding="same", name=f"pool{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.Conv3D(out_filters, 1, padding="same", name="conv_out")(x)
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


def build_models(shape: tuple[int, int, int] = DEFAULT_SHAPE,
                 arch: Architecture = Architecture()) -> tuple[keras.Model, keras.Model]:
    """A fresh (encoder, classifier) pair for (x, y, z) volumes of `shape`."""
    encoder = build_encoder(shape, arch)
    return encoder, build_classifier(int(encoder.output.shape[-1]))


def stack(encoder: keras.Model, classifier: keras.Model) -> keras.Model:
    """The end-to-end model image -> P(PD) that shares its layers with both parts."""
    inputs = keras.Input(encoder.inputs[0].shape[1:], name="image")
    return keras.Model(inputs, classifier(encoder(inputs)), name="sfcn")


def input_shape(encoder: keras.Model) -> tuple[int, int, int]:
    """The (x, y, z) volume shape an encoder takes."""
    return tuple(int(s) for s in encoder.inputs[0].shape[1:4])  # type: ignore[return-value]


def architecture(encoder: keras.Model) -> Architecture:
    """The `Architecture` an encoder was built with (read from its layers)."""
    names = {layer.name for layer in encoder.layers}
    return Architecture(width=encoder.get_layer("conv0").filters / FILTERS[0],
                        intensity="zscore" if "standardize" in names else "raw")


def in_current_precision(encoder: keras.Model,
                         classifier: keras.Model) -> tuple[keras.Model, keras.Model]:
    """The same weights in models built under the global dtype policy (float32 or mixed).

    A saved model keeps the policy it was trained with; a run that asks for another one
    rebuilds the layers and copies the weights.
    """
    # a loaded model takes the global policy, its layers keep the one they were saved with
    if encoder.get_layer("conv0").dtype_policy.name == keras.config.dtype_policy().name:
        return encoder, classifier
    new_encoder, new_classifier = build_models(input_shape(encoder), architecture(encoder))
    new_encoder.set_weights(encoder.get_weights())
    new_classifier.set_weights(classifier.get_weights())
    return new_encoder, new_classifier
