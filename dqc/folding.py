"""Prediction with each BatchNormalization folded into the convolution before it.

In inference mode a BatchNormalization is a per-channel affine map, so a convolution followed
by it is one convolution with a scaled kernel and a shifted bias:

    w' = w * s,  b' = (b - mean) * s + beta,  s = gamma / sqrt(variance + epsilon)

The encoder predicts the same scores (to float rounding, ~1e-7) without the two elementwise
passes over each block's activations, which cost more than the first convolution itself at
the demo's size (`python -m dqc.bench --modes fast,unfolded` measures it). The paper's rule
evaluates the whole validation set after every update, so these passes are most of its cost.

The folded model shares every layer but the folded convolutions with the trained model;
`sync` recomputes their weights from the trained ones, and is called before each prediction.
"""

from __future__ import annotations

import keras
from keras import layers, ops


def _chain(model: keras.Model) -> list[keras.layers.Layer] | None:
    """The layers of a functional model that is one chain (each takes the previous one's
    output), input layer excluded; None for any other graph."""
    found = model.layers[1:]
    previous = model.layers[0].output
    for layer in found:
        nodes = getattr(layer, "_inbound_nodes", [])
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1 \
                or nodes[0].input_tensors[0] is not previous:
            return None
        previous = layer.output
    return found if previous is model.output else None


def _foldable(conv: keras.layers.Layer, bn: keras.layers.Layer) -> bool:
    return (isinstance(conv, layers.Conv3D) and isinstance(bn, layers.BatchNormalization)
            and conv.data_format == "channels_last" and bn.axis in (-1, 4)
            and conv.activation is keras.activations.linear)


class FoldedModel(keras.Model):
    """An encoder+classifier for prediction only: the encoder's chain of layers with each
    Conv3D -> BatchNormalization pair replaced by one Conv3D whose weights `sync` derives
    from the pair. The other layers are the trained model's own (called, not copied).

    Build it with `fold`; it follows the trained model only through `sync`.
    """

    def __init__(self, encoder: keras.Model, classifier: keras.Model,
                 chain: list[keras.layers.Layer]):
        super().__init__(name="sfcn_folded")
        self.steps, self.pairs, self.head = [], [], classifier
        self.volume_dtype = encoder.inputs[0].dtype  # uint8 volumes come in as the model's did
        i = 0
        while i < len(chain):
            layer = chain[i]
            if i + 1 < len(chain) and _foldable(layer, chain[i + 1]):
                conv, bn = layer, chain[i + 1]
                folded = layers.Conv3D(conv.filters, conv.kernel_size, strides=conv.strides,
                                       padding=conv.padding, dilation_rate=conv.dilation_rate,
                                       groups=conv.groups, use_bias=True,
                                       dtype=conv.dtype_policy, name=f"{conv.name}_folded")
                folded.build(conv.input.shape)
                self.steps.append(folded)
                self.pairs.append((conv, bn, folded))
                i += 2
            else:
                self.steps.append(layer)
                i += 1
        self.build(encoder.inputs[0].shape)
        self.sync()

    def call(self, x, training=False):
        x = ops.cast(x, self.volume_dtype)
        for step in self.steps:
            x = step(x, training=False)
        return self.head(x, training=False)

    def sync(self) -> None:
        """Set each folded convolution from its trained Conv3D and BatchNormalization."""
        for conv, bn, folded in self.pairs:
            scale = ops.rsqrt(bn.moving_variance + bn.epsilon)
            if bn.scale:
                scale = scale * bn.gamma
            shift = -bn.moving_mean * scale
            if conv.use_bias:
                shift = shift + conv.bias * scale
            if bn.center:
                shift = shift + bn.beta
            folded.kernel.assign(conv.kernel * scale)
            folded.bias.assign(shift)


def fold(encoder: keras.Model, classifier: keras.Model) -> FoldedModel | None:
    """The folded prediction model of an encoder that is one chain of layers with at least
    one Conv3D -> BatchNormalization pair; None otherwise (predict with the model as it is).
    """
    chain = _chain(encoder)
    if chain is None or not any(_foldable(a, b) for a, b in zip(chain, chain[1:])):
        return None
    return FoldedModel(encoder, classifier, chain)
