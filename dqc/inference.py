"""Inference over the cycles of a travelling model: scores, per-cycle metrics and their plot.

`find_cycle_models` pairs encoder and classifier files by cycle, `predict_cycles` scores one
test table with every pair and computes `metrics.cohort_metrics` (overall, per sex, per age
group), `write_outputs` writes NAME_metrics.csv / NAME_predictions.csv (and the plot,
`dqc.plots.plot_metrics`).
Keras, scikit-learn, matplotlib and the writers are imported only where needed, so that a bad
flag, file or table fails in a second instead of after the TensorFlow start-up.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dqc import defaults
from dqc.data import format_shape, load_table
from dqc.errors import DQCError, error_reason
from dqc.progress import progress
from dqc.volumes import VolumeStore

if TYPE_CHECKING:
    import keras

#: Model file types, preferred first when a cycle has both.
MODEL_SUFFIXES: tuple[str, ...] = (".keras", ".h5")
#: A subject is predicted PD when score >= THRESHOLD.
THRESHOLD = 0.5
#: Columns of NAME_predictions.csv.
PREDICTION_COLUMNS: tuple[str, ...] = ("cycle", "Subject", "Study", "Sex", "Age", "Group_bin",
                                       "score", "prediction")
#: (column, label) of the metrics printed per cycle and plotted.
SHOWN_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
    ("auroc", "AUROC"), ("f1", "F1"))

#: (cycle or None, encoder file, classifier file)
CycleModels = tuple[int | None, Path, Path]

_MODEL_NAME = re.compile(r"(?P<prefix>.+)_(?P<part>encoder|classifier)_(?P<cycle>\d+)")
#: The authors' names: encoder_distributed_BS5_09.h5, classifier_PD_distributed_BS5_09.h5.
_AUTHORS_NAME = re.compile(r"(?P<part>encoder|classifier)(_PD)?_(?P<prefix>.+)_(?P<cycle>\d+)")


# --- finding the models ----------------------------------------------------------------------

def parse_cycles(text: str) -> range:
    """`"10:30"` -> cycles 10..29; `"5"` -> cycle 5 only; an empty side is open (`"10:"`)."""
    start, colon, end = str(text).strip().partition(":")
    try:
        if not start.strip() and not colon:
            raise ValueError
        first = int(start) if start.strip() else 0
        stop = (int(end) if end.strip() else sys.maxsize) if colon else first + 1
    except ValueError:
        raise DQCError(f"--cycles: expected START:END (e.g. 10:30, END excluded) or one cycle "
                       f"number, got {text!r}") from None
    if first < 0 or stop <= first:
        raise DQCError(f"--cycles: {text!r} selects no cycle (need 0 <= START < END)")
    return range(first, stop)


def format_cycles(cycles: range) -> str:
    """The inverse of `parse_cycles` (`10:30`, `10:` when open)."""
    return f"{cycles.start}:" + ("" if cycles.stop == sys.maxsize else str(cycles.stop))


def _model_name(path: Path, part: str) -> tuple[str, int] | None:
    """(prefix, cycle) when `path` is named PREFIX_<part>_CCC.keras/.h5 (or, for .h5, as the
    authors' script names it: encoder_PREFIX_CC.h5, classifier_PD_PREFIX_CC.h5), else None."""
    match = _MODEL_NAME.fullmatch(path.stem) or \
        (_AUTHORS_NAME.fullmatch(path.stem) if path.suffix == ".h5" else None)
    if path.suffix not in MODEL_SUFFIXES or not match or match["part"] != part:
        return None
    return match["prefix"], int(match["cycle"])


def _scan(folder: Path, part: str) -> dict[tuple[str, int], Path]:
    """(prefix, cycle) -> the `part` file of that cycle in `folder` (.keras before .h5)."""
    found: dict[tuple[str, int], Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (p.suffix != ".keras", p.name)):
        key = _model_name(path, part)
        if key is not None and path.is_file():
            found.setdefault(key, path)
    return found


def _choose_prefix(prefixes: Iterable[str], wanted: str | None, flag: str, folder: Path) -> str:
    options = sorted(set(prefixes))
    if wanted is None and len(options) == 1:
        return options[0]
    if wanted is None:
        raise DQCError(f"{flag} {folder}: holds the files of several runs ({', '.join(options)}); "
                       "choose one with --prefix")
    if wanted not in options:
        raise DQCError(f"{flag} {folder}: no model files with prefix {wanted!r} "
                       f"(found: {', '.join(options)})")
    return wanted


def _existing(path: str | Path, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DQCError(f"{flag} {path}: no such file or folder")
    return p


def _single_files(encoder: Path, classifier: Path, cycles: range | None) -> CycleModels:
    """One encoder file and one classifier file; the cycle comes from their names if it can."""
    en_name, pd_name = _model_name(encoder, "encoder"), _model_name(classifier, "classifier")
    if en_name and pd_name and en_name[1] != pd_name[1]:
        warnings.warn(f"{encoder.name} (cycle {en_name[1]}) and {classifier.name} "
                      f"(cycle {pd_name[1]}) are from different cycles; reporting cycle "
                      f"{en_name[1]}")
    cycle = en_name[1] if en_name else pd_name[1] if pd_name else None
    if cycles is not None and cycle is None:
        warnings.warn(f"--cycles ignored: {encoder.name} does not name its cycle")
    elif cycles is not None and cycle not in cycles:
        raise DQCError(f"--cycles {format_cycles(cycles)}: {encoder} is cycle {cycle}")
    return cycle, encoder, classifier


def find_cycle_models(en: str | Path, pd: str | Path, prefix: str | None = None,
                      cycles: range | None = None) -> list[CycleModels]:
    """The (cycle, encoder, classifier) files to evaluate, by increasing cycle.

    `en` / `pd` are both folders of per-cycle files (PREFIX_encoder_CCC.keras or legacy .h5,
    PREFIX_classifier_CCC.*) or both single model files (cycle parsed from the name, else
    None). `prefix` picks one run when a folder holds several; `cycles` keeps those cycles.
    """
    encoder_path, classifier_path = _existing(en, "-en"), _existing(pd, "-pd")
    if encoder_path.is_dir() != classifier_path.is_dir():
        raise DQCError("-en and -pd must both be folders of per-cycle model files or both "
                       f"single model files (got {en} and {pd})")
    if not encoder_path.is_dir():
        return [_single_files(encoder_path, classifier_path, cycles)]
    encoders = _scan(encoder_path, "encoder")
    if not encoders:
        raise DQCError(f"-en {en}: no encoder files (PREFIX_encoder_CCC.keras or .h5) in "
                       "this folder")
    run = _choose_prefix((p for p, _ in encoders), prefix, "-en", encoder_path)
    found = sorted(c for p, c in encoders if p == run)
    chosen = [c for c in found if cycles is None or c in cycles]
    if not chosen:
        raise DQCError(f"--cycles {format_cycles(cycles)}: no such cycle among those of "
                       f"{run} in {en} ({', '.join(map(str, found))})")
    classifiers = _scan(classifier_path, "classifier")
    if not classifiers:
        raise DQCError(f"-pd {pd}: no classifier files (PREFIX_classifier_CCC.keras or .h5) "
                       "in this folder")
    pd_prefixes = {p for p, _ in classifiers}
    pd_run = _choose_prefix(pd_prefixes, run if run in pd_prefixes else prefix, "-pd",
                            classifier_path)
    missing = [c for c in chosen if (pd_run, c) not in classifiers]
    if missing:
        raise DQCError(f"-pd {pd}: no classifier for cycle(s) {', '.join(map(str, missing))} "
                       f"of {run} (expected e.g. {pd_run}_classifier_{missing[0]:03d}.keras)")
    return [(c, encoders[run, c], classifiers[pd_run, c]) for c in chosen]


# --- predicting --------------------------------------------------------------------------

def saved_architecture(path: Path) -> object | None:
    """The architecture a `.keras` file holds (its config, less Keras' per-process object
    ids), or None for another kind of file or one that cannot be read."""
    import json
    import zipfile

    def plain(node):
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items() if k != "shared_object_id"}
        return [plain(v) for v in node] if isinstance(node, list) else node

    if path.suffix != ".keras":
        return None
    try:
        with zipfile.ZipFile(path) as saved:
            return plain(json.loads(saved.read("config.json")))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


class StackedModels:
    """Each cycle's image -> P(PD) model in turn, built once per architecture.

    A run's cycles share one architecture, so a cycle whose `.keras` files hold the same
    configs as the model at hand has its weights loaded into that model: its predict
    function is traced once, not once per cycle (a fresh model costs ~0.6 s more per
    cycle, mostly tracing, at any size). Any other pair (the authors' `.h5`, another
    architecture, a file that fails to load its weights) is loaded whole, with its
    one-line errors.
    """

    def __init__(self) -> None:
        self._key: tuple[object, object] | None = None
        self._parts: tuple[keras.Model, keras.Model] | None = None
        self._stacked: tuple[keras.Model, tuple[int, int, int]] | None = None

    def load(self, encoder_path: Path, classifier_path: Path
             ) -> tuple[keras.Model, tuple[int, int, int]]:
        key = (saved_architecture(Path(encoder_path)), saved_architecture(Path(classifier_path)))
        if None not in key and key == self._key:
            try:
                for part, path in zip(self._parts, (encoder_path, classifier_path)):
                    part.load_weights(path)
                return self._stacked
            except Exception:  # noqa: BLE001  (loaded whole below, with its one-line error)
                pass
        import keras

        from dqc.checkpoint import load_models
        from dqc.model import input_shape, stack

        self._key = self._parts = self._stacked = None
        keras.backend.clear_session()  # the models of earlier cycles would pile up otherwise
        encoder, classifier, _ = load_models(encoder_path, classifier_path)
        try:
            self._stacked = stack(encoder, classifier), input_shape(encoder)
        except ValueError as exc:  # e.g. feature count mismatch
            raise DQCError(f"{classifier_path}: does not fit the encoder {encoder_path} "
                           f"({error_reason(exc, 'mismatch', first_line=True)})") from None
        self._key, self._parts = key, (encoder, classifier)
        return self._stacked


def _scores(model: keras.Model, volumes: np.ndarray, batch_size: int) -> np.ndarray:
    """P(PD) per subject, `batch_size` volumes at a time, in inference mode."""
    from dqc.trainer import predict_in_batches

    return predict_in_batches(model, volumes, batch_size).astype(np.float64)


def prediction_frame(table: pd.DataFrame, cycle: int | None, scores: np.ndarray) -> pd.DataFrame:
    """One row per subject of `table`: its ground truth, score and prediction at `cycle`."""
    n = len(table)
    return pd.DataFrame({
        "cycle": pd.array([cycle] * n, dtype="Int64"),
        "Subject": table["Subject"].to_numpy(),
        "Study": table["Study"].to_numpy() if "Study" in table.columns else [""] * n,
        "Sex": table["Sex"].to_numpy(),
        "Age": table["Age"].to_numpy(),
        "Group_bin": table["Group_bin"].to_numpy(),
        "score": scores,
        "prediction": (scores >= THRESHOLD).astype(int),
    }, columns=list(PREDICTION_COLUMNS))


@contextlib.contextmanager
def _quiet_retracing() -> Iterator[None]:
    """Hide TensorFlow's "triggered tf.function retracing" warnings for a while.

    Each cycle loads a new model whose predict function is traced anew: expected here.
    """
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _metrics_warn_once(predictions: pd.DataFrame, age_bins: tuple[float, ...],
                       warned: set[str]) -> dict[str, float]:
    """`cohort_metrics`, passing on each `MetricWarning` text only the first time it is seen.

    The test set is the same every cycle, so an empty or one-class group would otherwise
    repeat the same warnings once per cycle. `warned` collects the texts already shown.
    """
    from dqc.metrics import MetricWarning, cohort_metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        row = cohort_metrics(predictions, age_bins, THRESHOLD)
    for w in caught:
        text = str(w.message)
        if not issubclass(w.category, MetricWarning) or text not in warned:
            warned.add(text)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return row


def predict_cycles(test_csv: str | Path, models: Sequence[CycleModels], eval_batch_size: int = defaults.EVAL_BATCH_SIZE,
                   verbose: bool = True, age_bins: Iterable[float] = (60, 70),
                   report: Callable[[dict], None] | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the test table with the model of every cycle: (metrics, predictions).

    The table and its volumes are read once (shape: the first encoder's input). Metrics are
    `cohort_metrics` of each cycle's predictions plus `cycle`, one row per cycle; `report`,
    if given, receives each row as soon as it is computed.
    """
    if eval_batch_size < 1:
        raise DQCError(f"--eval-batch-size must be at least 1, got {eval_batch_size}")
    if not models:
        raise DQCError("no models to evaluate")
    age_bins = tuple(age_bins)
    table = load_table(test_csv, "inference")

    from dqc.metrics import metrics_table
    from dqc.runtime import announce

    subjects = list(table["Subject"])
    store: VolumeStore | None = None
    stacked = StackedModels()
    rows, frames = [], []
    warned: set[str] = set()
    for cycle, encoder_path, classifier_path in progress(models, desc="cycles",
                                                         disable=not verbose):
        model, shape = stacked.load(encoder_path, classifier_path)
        announce()  # once: the backend computes from here on
        if store is None:
            store = VolumeStore(table, shape, desc="test images", verbose=verbose)
            volumes = store.stacked(subjects)  # once: uint8 stays uint8, cast in the model
        elif shape != store.shape:
            raise DQCError(f"{encoder_path}: takes {format_shape(shape)} volumes, the models "
                           f"before it {format_shape(store.shape)}")
        with _quiet_retracing():
            scores = _scores(model, volumes, eval_batch_size)
        frames.append(prediction_frame(table, cycle, scores))
        rows.append({"cycle": cycle, **_metrics_warn_once(frames[-1], age_bins, warned)})
        if report is not None:
            report(rows[-1])
    return metrics_table(rows), pd.concat(frames, ignore_index=True)


# --- reporting ---------------------------------------------------------------------------

def cycle_line(row: Mapping[str, object]) -> str:
    """`cycle   3  accuracy 0.812  sensitivity ...` for one metrics row."""
    cycle = row.get("cycle")
    tag = "   -" if cycle is None or pd.isna(cycle) else f"{int(cycle):4d}"
    return f"cycle {tag}  " + "  ".join(f"{label} {float(row[key]):.3f}"
                                        for key, label in SHOWN_METRICS)


def output_paths(out: str | Path, name: str, plot: bool = False) -> dict[str, Path]:
    """Where `write_outputs` writes: OUT/NAME_metrics.csv, _predictions.csv (and _metrics.png).

    NAME may include folders (relative to OUT). Raises `DQCError` on an empty NAME or when a
    target folder is a file, before any work is done.
    """
    base = Path(out).expanduser() / name
    if not str(name).strip() or not base.name or str(name).endswith(("/", "\\")):
        raise DQCError(f"-o: expected a file name prefix, got {name!r}")
    for folder in (base.parent, *base.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise DQCError(f"-o/--out: {folder} is a file, not a folder")
    paths = {"metrics": base.with_name(f"{base.name}_metrics.csv"),
             "predictions": base.with_name(f"{base.name}_predictions.csv")}
    if plot:
        paths["plot"] = base.with_name(f"{base.name}_metrics.png")
    return paths


def write_outputs(metrics: pd.DataFrame, predictions: pd.DataFrame,
                  paths: Mapping[str, Path]) -> None:
    """Write the tables (and the plot when `paths` has `plot`), each atomically."""
    from dqc.io import write_csv

    write_csv(paths["metrics"], metrics)
    write_csv(paths["predictions"], predictions)
    if "plot" in paths:
        from dqc.plots import plot_metrics

        name = paths["plot"].stem.removesuffix("_metrics")
        plot_metrics(metrics, paths["plot"], SHOWN_METRICS,
                     title=f"{name}: test-set metrics per cycle")
