"""Per-cycle model files, written atomically, and loading them back to continue exactly.

A cycle c of a run named PREFIX in folder OUT is three files:
  PREFIX_encoder_CCC.keras, PREFIX_classifier_CCC.keras  (Keras' native format)
  PREFIX_state_CCC.npz  (optimizer and dropout-seed state, plus a JSON `meta` record)
The state file is written last: a cycle counts as complete only when all three exist.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from dqc import authors
from dqc.errors import DQCError, error_reason
from dqc.io import write_model, write_npz
from dqc.model import in_current_precision
from dqc.trainer import Trainer

CYCLE_DIGITS = 3


def cycle_paths(out: str | Path, prefix: str, cycle: int) -> dict[str, Path]:
    tag = f"{cycle:0{CYCLE_DIGITS}d}"
    out = Path(out)
    return {"encoder": out / f"{prefix}_encoder_{tag}.keras",
            "classifier": out / f"{prefix}_classifier_{tag}.keras",
            "state": out / f"{prefix}_state_{tag}.npz"}


def state_path_for(classifier_path: str | Path) -> Path:
    """The state file that belongs to a classifier file (same folder, `_state_` name)."""
    p = Path(classifier_path)
    name = re.sub(r"_classifier_(\d+)$", r"_state_\1", p.stem)
    return p.with_name(name + ".npz")


def save_cycle(trainer: Trainer, out: str | Path, prefix: str, cycle: int,
               meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write encoder, classifier and state of `cycle`; the state file last."""
    paths = cycle_paths(out, prefix, cycle)
    for part in ("encoder", "classifier"):
        write_model(paths[part], getattr(trainer, part))
    record = {"cycle": cycle, **(meta or {})}
    write_npz(paths["state"], {"meta": np.array(json.dumps(record)), **trainer.training_state()})
    return paths


def load_model_file(path: str | Path, what: str) -> keras.Model:
    """Load a .keras (or legacy .h5) model with a one-line error on failure."""
    path = Path(path)
    if not path.is_file():
        raise DQCError(f"{path}: {what} model file not found")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        raise DQCError(f"{path}: cannot load {what} model "
                       f"({error_reason(exc, first_line=True)})") from None


#: What a model file of ours looks like, for the error when a file is neither ours nor theirs.
OURS = {"encoder": "our encoder (one input; layers conv0..conv4, bn0..bn4, conv_out, flatten)",
        "classifier": "our classifier (one input; a Dense layer pd)"}
OUR_LAYERS = {"encoder": ("conv0", "conv_out", "flatten"), "classifier": ("pd",)}


def _check_ours(model: keras.Model, path: Path, what: str) -> None:
    """A one-line error unless `model` has one input, one output and our layer names."""
    names = [layer.name for layer in model.layers]
    if len(model.inputs) == 1 and len(model.outputs) == 1 \
            and all(n in names for n in OUR_LAYERS[what]):
        return
    raise DQCError(f"{path}: not a model this program reads: expected {OURS[what]} or, in "
                   f"an .h5 file, {authors.EXPECTED}; found {len(model.inputs)} input(s), "
                   f"layers {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")


def load_models(encoder_path: str | Path, classifier_path: str | Path
                ) -> tuple[keras.Model, keras.Model, authors.AuthorsPair | None]:
    """(encoder, classifier) of ours, converted when the files are the authors' `.h5` pair.

    The third item is their checked pair (for its optimizer state and learning rate), or
    None for our own files.
    """
    if authors.is_authors_file(encoder_path):
        pair = authors.read_pair(encoder_path, classifier_path)
        return (*authors.build_ours(pair), pair)
    encoder = load_model_file(encoder_path, "encoder")
    classifier = load_model_file(classifier_path, "classifier")
    _check_ours(encoder, Path(encoder_path), "encoder")
    _check_ours(classifier, Path(classifier_path), "classifier")
    features, wanted = encoder.outputs[0].shape[-1], classifier.inputs[0].shape[-1]
    if int(features) != int(wanted):
        raise DQCError(f"{classifier_path}: classifier takes {wanted} features but the "
                       f"encoder gives {features}")
    return encoder, classifier, None


def load_trainer(encoder_path: str | Path, classifier_path: str | Path,
                 **trainer_kwargs) -> tuple[Trainer, dict[str, Any]]:
    """A Trainer from saved files, with the optimizer state when its state file exists
    (`trainer_for` of `load_models`)."""
    return trainer_for(load_models(encoder_path, classifier_path), classifier_path,
                       **trainer_kwargs)


def trainer_for(models: tuple[keras.Model, keras.Model, authors.AuthorsPair | None],
                classifier_path: str | Path, **trainer_kwargs) -> tuple[Trainer, dict[str, Any]]:
    """The Trainer of loaded models (`load_models`), with the optimizer state when its
    state file exists beside `classifier_path`.

    Returns the trainer and the state's `meta` record ({} when there is no state file:
    then a fresh optimizer is used, with a warning). The authors' `.h5` pair carries its
    own Adam state; one printed line says what was taken over.
    """
    encoder, classifier, pair = models
    trainer = Trainer(*in_current_precision(encoder, classifier), **trainer_kwargs)
    if pair is not None:
        print(authors.load_line(pair, authors.load_optimizer(pair, trainer.optimizer)))
        return trainer, {}
    state = state_path_for(classifier_path)
    if not state.is_file():
        warnings.warn(f"{state} not found: continuing with a fresh optimizer state")
        return trainer, {}
    meta, arrays = read_state(state)
    try:
        trainer.load_training_state(arrays)
    except ValueError as exc:
        raise DQCError(f"{state}: does not fit these models ({exc})") from None
    return trainer, meta


def read_state(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except Exception as exc:
        raise DQCError(f"{path}: cannot read training state ({type(exc).__name__})") from None
    return meta, arrays


def last_complete_cycle(out: str | Path, prefix: str) -> int | None:
    """The highest cycle of PREFIX in OUT whose three files all exist, or None."""
    cycles = []
    for state in Path(out).glob(f"{prefix}_state_*.npz"):
        match = re.fullmatch(rf"{re.escape(prefix)}_state_(\d+)", state.stem)
        if match and all(p.is_file() for p in cycle_paths(out, prefix, int(match[1])).values()):
            cycles.append(int(match[1]))
    return max(cycles) if cycles else None
