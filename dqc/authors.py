"""The authors' model files (Keras 2 `.h5`, `enc_PD_train_distributed.py`) in and out.

Their encoder is the paper's SFCN with layers conv1..conv6, norm1..norm6, maxpool1..maxpool5,
flat1 and one input `InputA` given as a list; their classifier is one Dense(1, sigmoid). Their
data generator feeds `sitk.GetArrayFromImage` arrays, (z, y, x), reshaped to the input shape
(a no-op when the image fits), while ours feeds (x, y, z). We therefore convert on load
instead of wrapping their model in a transpose: the 3x3x3 kernels are reversed along their
spatial axes and the classifier's rows are reordered to our flatten order, so our model on
an (x, y, z) array computes what theirs computes on the (z, y, x) array (every layer is
symmetric in the spatial axes: `same` 3x3x3 convolutions pad one voxel on each side, pools
treat each axis alike). The result is an ordinary model of ours that trains, saves, resumes
and is QC-checked like any other; only float32 summation order differs.

The files are read with h5py, not Keras' legacy loader: the layout (model_weights/LAYER,
optimizer_weights) is the same in Keras 2 and Keras 3 `.h5` files, the model configs are not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import keras
import numpy as np

from dqc.data import format_shape
from dqc.errors import DQCError, error_reason
from dqc.model import Architecture, architecture, build_models, input_shape

#: Their (conv, norm) layers, filters and kernel side, block by block, and our layer names.
BLOCKS: tuple[tuple[str, str, int, int, str, str], ...] = (
    ("conv1", "norm1", 32, 3, "conv0", "bn0"),
    ("conv2", "norm2", 64, 3, "conv1", "bn1"),
    ("conv3", "norm3", 128, 3, "conv2", "bn2"),
    ("conv4", "norm4", 256, 3, "conv3", "bn3"),
    ("conv5", "norm5", 256, 3, "conv4", "bn4"),
    ("conv6", "norm6", 64, 1, "conv_out", "bn_out"),
)
POOLS = 5
EXPECTED = ("the authors' SFCN encoder: one input (InputA, given as a list) and conv1..conv6 "
            "with 32, 64, 128, 256, 256, 64 filters (3x3x3 kernels, 1x1x1 for conv6), each "
            "followed by norm1..norm6, then flat1")
#: What their weights are called in Keras' order, per layer kind.
CONV_WEIGHTS = ("kernel", "bias")
NORM_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
#: Markers of their encoder file (ours names its layers conv0..conv4, bn0..bn4, flatten).
MARKERS = ("norm1", "conv6", "flat1")


@dataclass
class AuthorsFile:
    """What one of their `.h5` files holds: layers, weights, optimizer state, learning rate."""

    path: Path
    inputs: list[tuple[int | None, ...]]
    layer_names: list[str]
    weights: dict[str, dict[str, np.ndarray]]   # layer -> weight name (kernel, ...) -> array
    activations: dict[str, str]
    moments: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # m/v -> key -> arr
    iterations: int | None = None
    learning_rate: float | None = None


@dataclass
class AuthorsPair:
    """Their encoder and classifier, checked against their architecture."""

    encoder: AuthorsFile
    classifier: AuthorsFile
    shape: tuple[int, int, int]   # their input axes: (z, y, x) of the image
    dense: str                    # the classifier's Dense layer name

    @property
    def our_shape(self) -> tuple[int, int, int]:
        """The (x, y, z) volume shape our converted model takes."""
        return self.shape[::-1]  # type: ignore[return-value]

    def grid(self) -> tuple[int, int, int]:
        """Their final feature map's (z, y, x) size."""
        return final_grid(self.shape)


def final_grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The feature map size before flat1: five `same` 2x max pools, one `valid` 2x average."""
    def pooled(n: int) -> int:
        for _ in range(POOLS):
            n = -(-n // 2)
        return n // 2
    return tuple(pooled(int(n)) for n in shape)  # type: ignore[return-value]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_authors_file(path: str | Path) -> bool:
    """True for an `.h5` encoder with their layer names (norm1, conv6 or flat1)."""
    path = Path(path)
    if path.suffix.lower() != ".h5" or not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            names = [_text(n) for n in group.attrs.get("layer_names", [])]
    except OSError:
        return False
    return any(marker in names for marker in MARKERS)


def read_file(path: str | Path) -> AuthorsFile:
    """Layers, weights, optimizer moments, step count and learning rate of one `.h5` file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            config = json.loads(_text(f.attrs["model_config"]))
            training = json.loads(_text(f.attrs["training_config"])) \
                if "training_config" in f.attrs else {}
            group = f.get("model_weights", f)
            names = [_text(n) for n in group.attrs["layer_names"]]
            weights = {name: {_weight_name(w): np.asarray(group[name][_text(w)])
                              for w in group[name].attrs["weight_names"]} for name in names}
            optimizer = {_text(n): np.asarray(f["optimizer_weights"][_text(n)])
                         for n in f["optimizer_weights"].attrs["weight_names"]} \
                if "optimizer_weights" in f else {}
    except (OSError, KeyError, ValueError) as exc:
        raise DQCError(f"{path}: cannot read as a Keras .h5 model file ({type(exc).__name__}: "
                       f"{error_reason(exc, '', first_line=True, limit=120)})") from None
    layers = config.get("config", {}).get("layers", [])
    inputs = [tuple(c["config"].get("batch_input_shape") or c["config"].get("batch_shape"))
              for c in layers if c.get("class_name") == "InputLayer"]
    activations = {c["config"].get("name", ""): str(c["config"].get("activation"))
                   for c in layers if "activation" in c.get("config", {})}
    lr = training.get("optimizer_config", {}).get("config", {}).get("learning_rate")
    result = AuthorsFile(path, inputs, names, {k: v for k, v in weights.items() if v},
                         activations, learning_rate=float(lr) if isinstance(lr, (int, float))
                         else None)
    _read_optimizer(optimizer, result)
    return result


def _weight_name(name) -> str:
    """`conv1/kernel:0` (Keras 2) or `conv1/kernel` (Keras 3) -> `kernel`."""
    return _text(name).split("/")[-1].split(":")[0]


_SLOTS = {"m": "m", "v": "v", "momentum": "m", "velocity": "v"}


def _read_optimizer(arrays: dict[str, np.ndarray], into: AuthorsFile) -> None:
    """Adam's step count and moments keyed `layer_weight`, from any of three namings.

    Keras 2 (TF <= 2.10): `Adam/iter:0`, `Adam/conv1/kernel/m:0`; TF 2.11+: `Adam/iteration:0`,
    `Adam/m/conv1/kernel:0`; Keras 3: `adam/iteration`, `adam/conv1_kernel_momentum`.
    """
    for name, array in arrays.items():
        parts = name.split(":")[0].split("/")[1:] or [name]
        if parts[-1] in ("iter", "iteration", "iterations"):
            into.iterations = int(array)
            continue
        if len(parts) == 3 and parts[-1] in _SLOTS:          # conv1/kernel/m
            slot, key = _SLOTS[parts[-1]], f"{parts[0]}_{parts[1]}"
        elif len(parts) == 3 and parts[0] in _SLOTS:         # m/conv1/kernel
            slot, key = _SLOTS[parts[0]], f"{parts[1]}_{parts[2]}"
        elif len(parts) == 1 and (match := re.fullmatch(r"(.+)_(momentum|velocity)", parts[0])):
            slot, key = _SLOTS[match[2]], match[1]
        else:
            continue  # learning rate and other hyperparameters
        into.moments.setdefault(slot, {})[key] = array


def read_pair(encoder_path: str | Path, classifier_path: str | Path) -> AuthorsPair:
    """Both files, checked against their architecture; a one-line `DQCError` says what differs."""
    encoder, classifier = read_file(encoder_path), read_file(classifier_path)
    if len(encoder.inputs) != 1 or len(encoder.inputs[0]) != 5 or encoder.inputs[0][-1] != 1:
        raise DQCError(f"{encoder.path}: expected {EXPECTED}; found {len(encoder.inputs)} "
                       f"input(s) {', '.join(map(str, encoder.inputs))}")
    shape = tuple(int(s) for s in encoder.inputs[0][1:4])
    previous = 1
    for conv, norm, filters, side, _, _ in BLOCKS:
        kernel = encoder.weights.get(conv, {}).get("kernel")
        want = (side, side, side, previous, filters)
        if kernel is None or kernel.shape != want or set(encoder.weights[conv]) != \
                set(CONV_WEIGHTS) or set(encoder.weights.get(norm, {})) != set(NORM_WEIGHTS):
            found = "missing" if kernel is None else f"kernel {kernel.shape}"
            raise DQCError(f"{encoder.path}: expected {EXPECTED}; {conv}: {found}, expected "
                           f"kernel {want} with a bias and {norm} after it")
        previous = filters
    extra = sorted(set(encoder.weights) - {n for b in BLOCKS for n in b[:2]})
    if extra:
        raise DQCError(f"{encoder.path}: expected {EXPECTED}; found extra layer(s) with "
                       f"weights: {', '.join(extra)}")
    dense = list(classifier.weights)
    features = int(np.prod(final_grid(shape))) * BLOCKS[-1][2]
    kernel = classifier.weights[dense[0]].get("kernel") if len(dense) == 1 else None
    if not features or len(classifier.inputs) != 1 or kernel is None \
            or kernel.shape != (features, 1) \
            or classifier.activations.get(dense[0], "sigmoid") != "sigmoid":
        found = f"{len(classifier.inputs)} input(s), layers with weights {', '.join(dense)}" + \
            (f", kernel {kernel.shape}" if kernel is not None else "")
        raise DQCError(f"{classifier.path}: expected the authors' classifier for this encoder: "
                       f"one input and one Dense(1, sigmoid) on {features} features; found "
                       f"{found}")
    return AuthorsPair(encoder, classifier, shape, dense[0])  # type: ignore[arg-type]


# --- axis order ----------------------------------------------------------------------------

def flip_kernel(kernel: np.ndarray) -> np.ndarray:
    """A Conv3D kernel for (x, y, z) inputs from one for (z, y, x) inputs (and back)."""
    return np.ascontiguousarray(kernel.transpose(2, 1, 0, 3, 4))


def flip_rows(kernel: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Dense rows after a Flatten of a `grid`-shaped map reordered for the reversed axes.

    `grid` is the source's spatial shape; applying it with the reversed grid undoes it.
    """
    cells = kernel.reshape(*grid, -1, kernel.shape[-1])
    return np.ascontiguousarray(cells.transpose(2, 1, 0, 3, 4).reshape(kernel.shape))


def layer_pairs(dense: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(their layer, our layer, weight names) for every layer with weights."""
    pairs = []
    for conv, norm, _, _, our_conv, our_norm in BLOCKS:
        pairs += [(conv, our_conv, CONV_WEIGHTS), (norm, our_norm, NORM_WEIGHTS)]
    return pairs + [(dense, "pd", CONV_WEIGHTS)]


def reorder(name: str, array: np.ndarray, grid: tuple[int, int, int], dense: str) -> np.ndarray:
    """A weight (or its Adam moment) `layer/weight` for the other axis order.

    Kernels of convolutions are reversed along space, the Dense kernel `dense` has its rows
    reordered for a `grid`-shaped map before the flatten; everything else stays. Its own
    inverse with the reversed grid.
    """
    layer, weight = name.rsplit("/", 1)
    if weight != "kernel":
        return array
    return flip_rows(array, grid) if layer == dense else flip_kernel(array)


def to_ours(name: str, array: np.ndarray, pair: AuthorsPair) -> np.ndarray:
    """One of their weights (or its Adam moment) as our model needs it; `name` is theirs."""
    return reorder(name, array, pair.grid(), pair.dense)


# --- into our models -----------------------------------------------------------------------

def build_ours(pair: AuthorsPair) -> tuple[keras.Model, keras.Model]:
    """Our (encoder, classifier) for (x, y, z) volumes computing what their pair computes."""
    encoder, classifier = build_models(pair.our_shape, Architecture())
    for theirs, ours, names in layer_pairs(pair.dense):
        source = pair.classifier if ours == "pd" else pair.encoder
        model = classifier if ours == "pd" else encoder
        model.get_layer(ours).set_weights(
            [to_ours(f"{theirs}/{w}", source.weights[theirs][w], pair) for w in names])
    return encoder, classifier


def load_optimizer(pair: AuthorsPair, optimizer: keras.optimizers.Optimizer) -> str:
    """Put their two Adam states into our one Adam (built over both models); returns a note.

    Adam updates every weight from its own two moments and the shared step count, so one
    optimizer over both models is the same as theirs, one per model, stepped together; the
    moments of a kernel are reordered like the kernel. Fresh (and said why) when a file
    holds no optimizer state, or the two step counts differ.
    """
    files = (pair.encoder, pair.classifier)
    steps = {f.iterations for f in files}
    reason = None
    if any(f.iterations is None for f in files):
        reason = "no Adam state in " + ", ".join(f.path.name for f in files if f.iterations is None)
    elif len(steps) != 1:
        reason = f"their two optimizers' step counts differ ({', '.join(map(str, steps))})"
    by_name = {v.name: v for v in optimizer.variables}
    values = []
    for theirs, ours, names in layer_pairs(pair.dense):
        source = pair.classifier if ours == "pd" else pair.encoder
        for w in (n for n in names if not n.startswith("moving_")):
            for slot, suffix in (("m", "momentum"), ("v", "velocity")):
                array = source.moments.get(slot, {}).get(f"{theirs}_{w}")
                if array is None and reason is None:
                    reason = f"{source.path.name} has no Adam {slot} for {theirs}/{w}"
                if array is not None:
                    values.append((by_name[f"{ours}_{w}_{suffix}"],
                                   to_ours(f"{theirs}/{w}", array, pair)))
    if reason is not None:
        return f"the optimizer starts fresh: {reason}"
    for variable, array in values:
        variable.assign(array.astype(variable.dtype))
    optimizer.iterations.assign(steps.pop())
    return (f"their Adam state after {int(optimizer.iterations.numpy())} steps carried over "
            "(their two optimizers, one per model, as our one over both)")


def load_line(pair: AuthorsPair, note: str) -> str:
    """The one line a run prints when it starts from their files."""
    rates = {f.learning_rate for f in (pair.encoder, pair.classifier)}
    rate = "none stored" if rates == {None} else \
        " / ".join(f"{r:.6g}" for r in sorted(r for r in rates if r is not None))
    return (f"authors' model files {pair.encoder.path.name}, {pair.classifier.path.name}: input "
            f"{format_shape(pair.shape)} (z, y, x), read as {format_shape(pair.our_shape)} "
            f"(x, y, z) volumes; stored learning rate {rate}; {note}")


# --- out of our models: their .h5 layout -----------------------------------------------------

KERAS2_VERSION = "2.10.0"


def _node(cls: str, name: str, inbound: str | None, **config) -> dict:
    config = {"name": name, "trainable": True, "dtype": "float32", **config}
    return {"class_name": cls, "config": config, "name": name,
            "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else []}


def _input(name: str, shape: tuple[int, ...]) -> dict:
    return {"class_name": "InputLayer", "name": name, "inbound_nodes": [],
            "config": {"batch_input_shape": [None, *shape], "dtype": "float32",
                       "sparse": False, "ragged": False, "name": name}}


def encoder_config(shape: tuple[int, int, int]) -> dict:
    """The Keras 2 model config `enc_PD_train_distributed.py` saves for (z, y, x) `shape`."""
    layers, previous = [_input("InputA", (*shape, 1))], "InputA"
    cube, channels = [2, 2, 2], "channels_last"

    def add(cls: str, name: str, **config) -> None:
        nonlocal previous
        layers.append(_node(cls, name, previous, **config))
        previous = name
    for i, (conv, norm, filters, side, _, _) in enumerate(BLOCKS):
        add("Conv3D", conv, filters=filters, kernel_size=[side] * 3, strides=[1, 1, 1],
            padding="same", data_format=channels, dilation_rate=[1, 1, 1], groups=1,
            activation="linear", use_bias=True)
        add("BatchNormalization", norm, axis=-1, momentum=0.99, epsilon=0.001, center=True,
            scale=True)
        if i < POOLS:
            add("MaxPooling3D", f"maxpool{i + 1}", pool_size=cube, padding="same",
                strides=cube, data_format=channels)
        add("ReLU", "re_lu" + (f"_{i}" if i else ""), max_value=None, negative_slope=0.0,
            threshold=0.0)
    add("AveragePooling3D", "average_pooling3d", pool_size=cube, padding="valid", strides=cube,
        data_format=channels)
    add("Dropout", "dropout", rate=0.2, noise_shape=None, seed=None)
    add("Flatten", "flat1", data_format=channels)
    return {"class_name": "Functional", "config": {
        "name": "model", "layers": layers, "input_layers": [["InputA", 0, 0]],
        "output_layers": [["flat1", 0, 0]]}}


def classifier_config(features: int) -> dict:
    """Their `add_PD_layer` model: input_1 -> Dense(1, sigmoid) named dense."""
    return {"class_name": "Functional", "config": {
        "name": "model_1", "input_layers": [["input_1", 0, 0]], "output_layers": [["dense", 0, 0]],
        "layers": [_input("input_1", (features,)),
                   _node("Dense", "dense", "input_1", units=1, activation="sigmoid",
                         use_bias=True)]}}


def _names(names: list[str]) -> np.ndarray:
    """A name list as Keras 2 stores it in an attribute: fixed-length bytes."""
    return np.array([n.encode("utf8") for n in names])


def _write_h5(path: Path, config: dict, weights: dict[str, dict[str, np.ndarray]],
              optimizer: list[tuple[str, np.ndarray]], learning_rate: float) -> None:
    """A Keras 2 `model.save('x.h5')` file: model_config, model_weights, optimizer_weights."""
    from dqc.io import atomic_write

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["keras_version"] = KERAS2_VERSION
            f.attrs["backend"] = "tensorflow"
            f.attrs["model_config"] = json.dumps(config)
            f.attrs["training_config"] = json.dumps({
                "loss": None, "metrics": None, "weighted_metrics": None, "loss_weights": None,
                "optimizer_config": {"class_name": "Adam", "config": {
                    "name": "Adam", "learning_rate": learning_rate, "decay": 0.0,
                    "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": False}}})
            group = f.create_group("model_weights")
            layers = [c["name"] for c in config["config"]["layers"]]
            group.attrs["layer_names"] = _names(layers)
            group.attrs["keras_version"] = KERAS2_VERSION
            group.attrs["backend"] = "tensorflow"
            for layer in layers:
                names = [f"{layer}/{w}:0" for w in weights.get(layer, {})]
                sub = group.create_group(layer)
                sub.attrs["weight_names"] = _names(names)
                for name, array in zip(names, weights.get(layer, {}).values()):
                    sub.create_dataset(name, data=array)
            if optimizer:
                opt = f.create_group("optimizer_weights")
                opt.attrs["weight_names"] = _names([n for n, _ in optimizer])
                for name, array in optimizer:
                    opt.create_dataset(name, data=array)
    atomic_write(path, write)


def export_pair(encoder: keras.Model, classifier: keras.Model, out: str | Path, name: str,
                optimizer: keras.optimizers.Optimizer | None = None,
                learning_rate: float = 1e-4) -> tuple[Path, Path]:
    """Write encoder_NAME.h5 and classifier_PD_NAME.h5 as their script saves them.

    Only the paper's model (width 1, raw intensities, `valid` final pooling) has such a
    layout. Their Adam state (`Adam/iter:0`, then every weight's `m`, then every `v`, the
    order of the TF 2.x Keras 2 Adam) is written when `optimizer` has taken steps.
    """
    arch = architecture(encoder)
    if arch != Architecture() or encoder.get_layer("avgpool").padding != "valid":
        raise DQCError(f"only the paper's model has an authors' layout (width 1, raw "
                       f"intensities, volumes of 33 voxels or more a side); this one has "
                       f"width {arch.width}, intensity {arch.intensity}, input "
                       f"{format_shape(input_shape(encoder))}")
    grid = final_grid(input_shape(encoder))  # ours, (x, y, z)
    files = {"encoder": {}, "classifier": {}}
    optimizers: dict[str, list] = {"encoder": [], "classifier": []}
    moments = {v.name: v for v in optimizer.variables} if optimizer is not None else {}
    steps = int(optimizer.iterations.numpy()) if optimizer is not None else 0
    for theirs, ours, names in layer_pairs("dense"):
        part = "classifier" if ours == "pd" else "encoder"
        layer = (classifier if ours == "pd" else encoder).get_layer(ours)
        values = [keras.ops.convert_to_numpy(w).astype(np.float32) for w in layer.weights]
        files[part][theirs] = {w: reorder(f"{theirs}/{w}", v, grid, "dense")
                               for w, v in zip(names, values)}
        for slot, suffix in (("m", "momentum"), ("v", "velocity")):
            optimizers[part] += [(slot, f"Adam/{theirs}/{w}/{slot}:0", reorder(
                f"{theirs}/{w}", keras.ops.convert_to_numpy(moments[f"{ours}_{w}_{suffix}"]),
                grid, "dense")) for w in names if steps and not w.startswith("moving_")]
    paths = (Path(out) / f"encoder_{name}.h5", Path(out) / f"classifier_PD_{name}.h5")
    configs = (encoder_config(input_shape(encoder)[::-1]), classifier_config(
        int(classifier.inputs[0].shape[-1])))
    for path, part, config in zip(paths, ("encoder", "classifier"), configs):
        slots = optimizers[part]
        state = [("Adam/iter:0", np.int64(steps))] + \
            [(n, a) for s in ("m", "v") for slot, n, a in slots if slot == s] if slots else []
        _write_h5(path, config, files[part], state, learning_rate)
    return paths
