"""One model and its optimizer: train a step, evaluate in batches, snapshot and restore.

Written in backend-agnostic Keras 3 (`train_on_batch` / `predict_on_batch`, `keras.ops`), so
the same code runs under TensorFlow (default) and JAX.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np

from dqc import defaults
from dqc.folding import fold
from dqc.model import stack
from dqc.runtime import announce
from dqc.timing import Timings

BASE_LEARNING_RATE = 1e-4
LR_SCHEDULES = defaults.LR_SCHEDULES


def learning_rate(cycle: int, base: float = BASE_LEARNING_RATE) -> float:
    """Cycle c trains at base * exp(-0.1 * c): the authors' per-cycle decay, never restarted."""
    return base * math.exp(-0.1 * cycle)


def cycle_learning_rate(cycle: int, first: int,
                        schedule: str = defaults.LR_SCHEDULE) -> float:
    """The rate of `cycle` in a run that started at cycle `first`.

    continue: `learning_rate(cycle)`. restart (the authors' dirty and QC scripts): the first
    cycle keeps the loaded optimizer's rate, `learning_rate(first)`, and the decay then
    starts over, `learning_rate(cycle - first)`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    restarted = schedule == "restart" and cycle != first
    return learning_rate(cycle - first if restarted else cycle)


class Trainer:
    """The stacked encoder+classifier with one Adam optimizer and binary cross-entropy."""

    def __init__(self, encoder: keras.Model, classifier: keras.Model, eval_batch_size: int = defaults.EVAL_BATCH_SIZE,
                 jit_compile: bool | str | None = None, host_snapshots: bool = False,
                 fold_batchnorm: bool = True):
        announce()  # the backend starts computing here: name it, device and precision
        self.encoder, self.classifier = encoder, classifier
        self.model = stack(encoder, classifier)
        self.optimizer = keras.optimizers.Adam(learning_rate=BASE_LEARNING_RATE)
        if jit_compile is None:  # XLA made this 3D CNN ~1.5-2.5x slower under TF on CPU
            jit_compile = keras.backend.backend() != "tensorflow"
        self.model.compile(optimizer=self.optimizer, loss="binary_crossentropy",
                           metrics=["accuracy"], jit_compile=jit_compile)
        self.optimizer.build(self.model.trainable_variables)
        self.eval_batch_size = eval_batch_size
        self.host_snapshots = host_snapshots  # the authors' way: copy weights to the host
        # predictions through one convolution per Conv3D+BN pair (dqc.folding); the authors'
        # way predicts with the layers as trained
        self.folded = fold(encoder, classifier) if fold_batchnorm else None
        self.warm_up()

    @property
    def predictor(self) -> keras.Model:
        """The model `predict` runs: the folded one where there is one."""
        return self.model if self.folded is None else self.folded

    def warm_up(self) -> None:
        """Trace training and prediction for a variable batch size before the first real step.

        TensorFlow retraces for a new batch shape and, from the second shape on, falls back to
        a graph with an unknown batch size, whose kernels round slightly differently. Tracing
        that graph now means every real step runs the same graph whatever came before, so a
        run resumed from files matches an uninterrupted run bit for bit. Under TensorFlow it
        is traced once, for any batch size (`trace_for_any_batch`); otherwise (JAX compiles
        per shape) by steps on batches of 1 and 2, the state restored after them.
        """
        shape = tuple(self.model.input.shape[1:])
        if keras.backend.backend() == "tensorflow" and trace_for_any_batch(self.model, shape) \
                and trace_prediction_for_any_batch(self.predictor, shape):
            return
        saved = self.snapshot()
        for n in (1, 2):
            x = np.zeros((n, *shape), np.float32)
            self.model.train_on_batch(x, np.zeros((n, 1), np.float32))
            self.predictor.predict_on_batch(x)
            self.predictor.predict_on_batch(x.astype(np.uint8))  # validation sets stay uint8
        self.restore(saved)

    # --- training --------------------------------------------------------------------------
    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate.assign(value)

    def hold_out_momentum(self) -> None:
        """Zero Adam's first moments: the next step follows that batch's own gradient.

        The second moments stay, so the step keeps Adam's per-weight scale; it is (1 - beta1)
        of an ordinary step whose gradients all agreed.
        """
        for variable in self.optimizer.variables:
            if variable.path.endswith("_momentum"):
                variable.assign(keras.ops.zeros_like(variable))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One optimizer step on one batch; returns (loss, accuracy) of that batch."""
        loss, acc = self.model.train_on_batch(x, y.reshape(-1, 1))
        return float(loss), float(acc)

    def predict(self, x) -> np.ndarray:
        """P(PD) for every volume of x, in batches of `eval_batch_size` (inference mode).

        x is a numpy array or a backend tensor already on the device (see `on_device`).
        """
        if self.folded is not None:
            self.folded.sync()
        return predict_in_batches(self.predictor, x, self.eval_batch_size)

    @staticmethod
    def on_device(x: np.ndarray):
        """Move an array to the backend's default device once (e.g. a whole validation set)."""
        return keras.ops.convert_to_tensor(x)

    # --- state -----------------------------------------------------------------------------
    @property
    def state_variables(self) -> list:
        """Everything one update changes: weights, BN statistics, dropout seed, optimizer."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def snapshot(self) -> list:
        """A copy of the state on the device (no host round trip unless `host_snapshots`)."""
        if self.host_snapshots:
            return self.state_arrays()
        return [keras.ops.copy(v.value) for v in self.state_variables]

    def restore(self, snapshot: list) -> None:
        """Put back a snapshot; values are bit-identical to when it was taken.

        Each value is copied in, so the snapshot outlives the next step: under JAX a variable
        takes the array itself, and a compiled train step donates (frees) its input buffers.
        """
        for variable, value in zip(self.state_variables, snapshot):
            variable.assign(keras.ops.copy(value))

    def state_arrays(self) -> list[np.ndarray]:
        """Host copy of the whole state, in `state_variables` order (what travels to a node)."""
        return [v.numpy() for v in self.state_variables]

    def state_spec(self, model_only: bool = False) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype) of each `state_arrays` entry."""
        return [(tuple(v.shape), str(v.dtype)) for v in self._variables(model_only)]

    def model_arrays(self) -> list[np.ndarray]:
        """Host copy of what prediction needs (weights and BatchNorm statistics): what a
        center that verifies an update is sent, a third of `state_arrays` (no Adam state)."""
        return [v.numpy() for v in self.model.variables]

    def _variables(self, model_only: bool) -> list:
        return list(self.model.variables) if model_only else self.state_variables

    def load_state_arrays(self, arrays: Sequence[np.ndarray], model_only: bool = False) -> None:
        """Take over a state from `state_arrays` (or `model_arrays` with `model_only`) of a
        model built the same way."""
        variables = self._variables(model_only)
        if len(arrays) != len(variables):
            raise ValueError(f"state holds {len(arrays)} arrays, this model needs {len(variables)}")
        for variable, array in zip(variables, arrays):
            if tuple(array.shape) != tuple(variable.shape):
                raise ValueError(f"{variable.path}: shape {tuple(array.shape)}, model needs "
                                 f"{tuple(variable.shape)}")
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def training_state(self) -> dict[str, np.ndarray]:
        """Host copy of what the .keras files do not hold: optimizer and dropout seed state."""
        extra = self._extra_variables()
        return {f"v{i:04d}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(extra)}

    def load_training_state(self, arrays: dict[str, np.ndarray]) -> None:
        extra = self._extra_variables()
        if len(arrays) != len(extra):
            raise ValueError(f"training state holds {len(arrays)} arrays, model needs {len(extra)}")
        for i, variable in enumerate(extra):
            variable.assign(arrays[f"v{i:04d}"])

    def _extra_variables(self) -> list:
        saved = {id(v) for v in self.encoder.weights + self.classifier.weights}
        return [v for v in self.state_variables if id(v) not in saved]


def trace_for_any_batch(model: keras.Model, shape: tuple[int, ...]) -> bool:
    """TensorFlow: trace a compiled model's training step once, for an unknown batch size,
    before its first call (its prediction: `trace_prediction_for_any_batch`).

    Calls on batches of 1 then 2 give the same graphs after two traces of the training step
    (the first for its shape, the second relaxed to any batch size; ~2 s each at the tests'
    sizes). The accuracy metric's variables are made first, outside the trace: a trace that
    creates variables is followed by a second one at the next call. Returns False, having
    traced nothing, where Keras' training step is not laid out as expected (another Keras).
    """
    import tensorflow as tf

    step = keras_train_step(model)
    if not hasattr(step, "get_concrete_function"):
        return False
    x, y = np.zeros((2, *shape), np.float32), np.zeros((2, 1), np.float32)
    model.compute_metrics(x, y, model(x), sample_weight=None)
    model.reset_metrics()
    step.get_concrete_function((tf.TensorSpec((None, *shape), tf.float32),
                                tf.TensorSpec((None, 1), tf.float32), None))
    return True


def trace_prediction_for_any_batch(model: keras.Model, shape: tuple[int, ...]) -> bool:
    """TensorFlow: trace a model's `predict_on_batch` once for float32 and once for uint8
    volumes (validation sets stay uint8), for an unknown batch size; False, having traced
    nothing, where Keras' prediction function is not a `tf.function`."""
    import tensorflow as tf

    model.make_predict_function()
    predict = model.predict_function
    if not hasattr(predict, "get_concrete_function"):
        return False
    for dtype in (tf.float32, tf.uint8):
        predict.get_concrete_function([(tf.TensorSpec((None, *shape), dtype),)])
    return True


def keras_train_step(model: keras.Model):
    """TensorFlow: the `tf.function` behind a compiled model's `train_on_batch` (Keras keeps
    it in the closure of `model.train_function`), or None where Keras lays it out otherwise."""
    model.make_train_function()
    train = model.train_function
    names = getattr(getattr(train, "__code__", None), "co_freevars", ())
    cells = dict(zip(names, (c.cell_contents for c in getattr(train, "__closure__", None) or ())))
    return getattr(cells.get("one_step_on_data"), "__wrapped__", None)


def predict_in_batches(model: keras.Model, x, batch_size: int) -> np.ndarray:
    """P(PD) for every volume of x (numpy or device tensor), `batch_size` at a time.

    A volume is never predicted alone: TensorFlow's kernels for a batch of one round
    differently (measured: up to 3e-8), so a last batch of one is predicted twice in a batch
    of two. Every volume's score then is the same bits whatever the batch it falls in, and
    a center that predicts its share of the validation set scores it exactly as one machine
    that predicts the whole set.
    """
    def scores(chunk):
        if len(chunk) == 1:
            return np.asarray(model.predict_on_batch(keras.ops.concatenate([chunk, chunk])))[:1]
        return np.asarray(model.predict_on_batch(chunk))

    n = len(x)
    return np.concatenate([scores(x[i:i + batch_size]).reshape(-1)
                           for i in range(0, n, batch_size)]) if n else np.zeros(0, np.float32)


def predict_subjects(trainer: Trainer, store, subjects: Sequence[str],
                     timings: Timings | None = None) -> np.ndarray:
    """Scores for subjects of a `VolumeStore`, one batch of volumes in memory at a time."""
    clock, b, parts = timings or Timings(), trainer.eval_batch_size, []
    for i in range(0, len(subjects), b):
        with clock("data"):
            x = store.batch(subjects[i:i + b])
        with clock("evaluate"):
            parts.append(trainer.predict(x))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
