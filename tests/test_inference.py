"""Inference over cycles: finding model files, per-cycle metrics tied to the predictions, CLI."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.cli import run_main
from dqc.cohort import build_cohort
from dqc.errors import DQCError
from dqc.inference import find_cycle_models, parse_cycles
from dqc.metrics import OVERALL_METRICS, MetricWarning

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "inference" / "inference_pd_distributed.py"
TRAIN = ROOT / "standard_travelling_model" / "enc_PD_train_distributed.py"
N_TEST = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def _start(*args: object, cwd: Path = ROOT) -> subprocess.Popen:
    """Start the inference script; runs are started together and collected with `_finish`."""
    script = os.path.relpath(SCRIPT, cwd)
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _script_main(path: Path) -> Callable[[list[str]], object]:
    """A script's `main`, to run in this process (no second TensorFlow start-up)."""
    return runpy.run_path(str(path), run_name=path.stem)["main"]


def _run_in_process(path: Path, *args: object) -> str:
    """Run a script's main here with --quiet; return what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # Keras on NumPy 2, not ours
        _script_main(path)([*map(str, args), "--quiet"])
    return printed.getvalue()


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tables(out: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_csv(out / f"{name}_metrics.csv"),
            pd.read_csv(out / f"{name}_predictions.csv", dtype={"Subject": str, "Study": str}))


# --- finding model files (no Keras) ----------------------------------------------------------

def test_parse_cycles() -> None:
    assert parse_cycles("10:30") == range(10, 30)
    assert parse_cycles("5") == range(5, 6)
    assert parse_cycles(":3") == range(0, 3)
    assert 10**6 in parse_cycles("4:")
    for bad in ("", "a:b", "1-2", "3:3", "5:2", "-1:4", "1:2:3"):
        with pytest.raises(DQCError, match="--cycles"):
            parse_cycles(bad)


def test_folder_pairs_cycles_and_filters(tmp_path: Path) -> None:
    folder = _touch(tmp_path / "m", *(f"tm_{part}_{c:03d}.keras" for c in range(4)
                                      for part in ("encoder", "classifier", "state")),
                    "tm_encoder_004.h5", "tm_classifier_004.h5", "notes.txt")
    found = find_cycle_models(folder, folder)
    assert [c for c, _, _ in found] == [0, 1, 2, 3, 4]
    assert found[4][1:] == (folder / "tm_encoder_004.h5", folder / "tm_classifier_004.h5")
    assert [c for c, _, _ in find_cycle_models(folder, folder, cycles=range(1, 3))] == [1, 2]
    with pytest.raises(DQCError, match="no such cycle"):
        find_cycle_models(folder, folder, cycles=range(7, 9))


def test_folder_with_several_runs_needs_a_prefix(tmp_path: Path) -> None:
    folder = _touch(tmp_path, "a_encoder_000.keras", "a_classifier_000.keras",
                    "b_encoder_003.keras", "b_classifier_003.keras")
    with pytest.raises(DQCError, match=r"several runs \(a, b\).*--prefix"):
        find_cycle_models(folder, folder)
    assert find_cycle_models(folder, folder, prefix="b") == [
        (3, folder / "b_encoder_003.keras", folder / "b_classifier_003.keras")]
    with pytest.raises(DQCError, match="prefix 'c'"):
        find_cycle_models(folder, folder, prefix="c")


def test_missing_classifier_is_one_line(tmp_path: Path) -> None:
    folder = _touch(tmp_path, "tm_encoder_000.keras", "tm_classifier_000.keras",
                    "tm_encoder_001.keras")
    with pytest.raises(DQCError, match="no classifier for cycle.s. 1") as err:
        find_cycle_models(folder, folder)
    assert "\n" not in str(err.value)


def test_single_files_and_mixed_inputs(tmp_path: Path) -> None:
    folder = _touch(tmp_path, "tm_encoder_007.keras", "tm_classifier_007.keras",
                    "enc.h5", "cls.h5")
    assert find_cycle_models(folder / "tm_encoder_007.keras", folder / "tm_classifier_007.keras"
                             ) == [(7, folder / "tm_encoder_007.keras",
                                    folder / "tm_classifier_007.keras")]
    assert find_cycle_models(folder / "enc.h5", folder / "cls.h5")[0][0] is None
    with pytest.raises(DQCError, match="both be folders"):
        find_cycle_models(folder, folder / "cls.h5")


# --- the script ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("inference_cohort")
    return build_cohort(out, centers=3, n_train=12, n_val=8, n_test=N_TEST, downsample=8,
                        seed=0, verbose=False)


@pytest.fixture(scope="module")
def bad_runs(small_cohort: dict, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, list[str]]:
    """Arguments of runs that must fail before any model is loaded."""
    tmp = tmp_path_factory.mktemp("failures")
    dummy = _touch(tmp / "dummy", "tm_encoder_000.keras", "tm_classifier_000.keras")
    empty = _touch(tmp / "empty", "readme.txt")
    no_age = tmp / "no_age.csv"
    pd.read_csv(small_cohort["test"]).drop(columns="Age").to_csv(no_age, index=False)
    test = small_cohort["test"]
    runs = {
        "missing model folder": ["-fn", test, "-en", tmp / "nope", "-pd", tmp / "nope"],
        "no model files": ["-fn", test, "-en", empty, "-pd", empty],
        "no Age column": ["-fn", no_age, "-en", dummy, "-pd", dummy],
        "bad --cycles": ["-fn", test, "-en", dummy, "-pd", dummy, "--cycles", "1-2"],
    }
    return {case: [*map(str, args), "-o", "x", "--out", str(tmp)] for case, args in runs.items()}


@pytest.fixture(scope="module")
def models(small_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cycles 0 and 1 of the standard travelling model, trained in this process."""
    out = tmp_path_factory.mktemp("models")
    _run_in_process(TRAIN, "-fn_train", small_cohort["train"], "-cycles", 2, "--out", out)
    return out


@dataclass(frozen=True)
class Runs:
    """The successful runs: their output folder and what each printed on stdout."""

    out: Path
    stdout: dict[str, str]


@pytest.fixture(scope="module")
def runs(small_cohort: dict, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The successful runs, all writing into one folder.

    all: subprocess from the repo root, model folders, every cycle, --plot. readme: the
    authors' README command, subprocess in the script's folder, relative paths, the single
    files of cycle 1, no --out. one: --cycles 1:2, in this process while the others run.
    """
    out = tmp_path_factory.mktemp("inference")
    test = small_cohort["test"]
    here = SCRIPT.parent

    def rel(path: Path) -> str:
        return os.path.relpath(path, here)
    started = {
        "all": _start("-fn", test, "-en", models, "-pd", models, "-o", "all", "--out", out,
                      "--plot", "--quiet"),
        "readme": _start("-fn", rel(test), "-en", rel(models / "tm_encoder_001.keras"),
                         "-pd", rel(models / "tm_classifier_001.keras"),
                         "-o", rel(out / "filename_to_save"), cwd=here),
    }
    printed = _run_in_process(SCRIPT, "-fn", test, "-en", models, "-pd", models, "-o", "one",
                              "--out", out, "--cycles", "1:2")
    stdout = {"one": printed}
    for name, proc in started.items():
        result = _finish(proc)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        stdout[name] = result.stdout
    return Runs(out, stdout)


def test_metrics_one_row_per_cycle(runs: Runs, small_cohort: dict) -> None:
    metrics, _ = _tables(runs.out, "all")
    assert metrics["cycle"].tolist() == [0, 1]
    sexes = sorted(pd.read_csv(small_cohort["test"])["Sex"].astype(str).unique())
    groups = [f"sex_{s}" for s in sexes] + ["age_<60", "age_60-70", "age_>=70"]
    expected = ["cycle", *OVERALL_METRICS] + [f"{g}_{m}" for g in groups
                                              for m in ("n", "accuracy", "sensitivity",
                                                        "specificity", "auroc")]
    assert metrics.columns.tolist() == expected
    assert (metrics["n"] == N_TEST).all()
    assert metrics[[f"sex_{s}_n" for s in sexes]].sum(axis=1).eq(N_TEST).all()
    lines = runs.stdout["all"].splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["cycle", "0"], ["cycle", "1"]]
    assert all(word in lines[0] for word in ("accuracy", "sensitivity", "specificity",
                                             "AUROC", "F1"))
    assert sum(line.startswith("wrote ") for line in lines) == 3


def test_predictions_are_what_the_metrics_measure(runs: Runs, small_cohort: dict) -> None:
    metrics, predictions = _tables(runs.out, "all")
    test = pd.read_csv(small_cohort["test"], dtype={"Subject": str})
    assert predictions.columns.tolist() == ["cycle", "Subject", "Study", "Sex", "Age",
                                            "Group_bin", "score", "prediction"]
    assert len(predictions) == 2 * N_TEST
    assert predictions["score"].between(0, 1).all()
    assert (predictions["prediction"] == (predictions["score"] >= 0.5).astype(int)).all()
    for cycle, rows in predictions.groupby("cycle"):
        assert rows["Subject"].tolist() == test["Subject"].tolist()
        assert rows["Group_bin"].tolist() == test["Group_bin"].tolist()
        accuracy = (rows["prediction"] == rows["Group_bin"]).mean()
        assert metrics.loc[metrics.cycle == cycle, "accuracy"].item() == pytest.approx(accuracy)


def test_plot_is_a_png(runs: Runs) -> None:
    png = (runs.out / "all_metrics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_cycles_flag_keeps_only_those_cycles(runs: Runs) -> None:
    metrics, predictions = _tables(runs.out, "one")
    assert metrics["cycle"].tolist() == [1]
    assert set(predictions["cycle"]) == {1} and len(predictions) == N_TEST
    assert runs.stdout["one"].splitlines()[0].split()[:2] == ["cycle", "1"]


def test_readme_command_with_single_files_matches_the_folder_run(runs: Runs) -> None:
    metrics, predictions = _tables(runs.out, "filename_to_save")
    _, every_cycle = _tables(runs.out, "all")
    folder = every_cycle[every_cycle.cycle == 1].reset_index(drop=True)
    assert metrics["cycle"].tolist() == [1]
    assert predictions["Subject"].tolist() == folder["Subject"].tolist()
    np.testing.assert_allclose(predictions["score"], folder["score"], rtol=0, atol=1e-6)


def _assert_one_error_line(status: object, stderr: str, message: str) -> None:
    assert status == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("case, message", [
    ("missing model folder", "no such file or folder"),
    ("no model files", "no encoder files"),
    ("no Age column", "missing column(s) Age"),
    ("bad --cycles", "--cycles: expected START:END"),
])
def test_errors_are_one_line(bad_runs: dict, case: str, message: str,
                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    """Through `run_main(main)`, exactly what the script runs as __main__, in this process."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # run_main replaces it
    main = _script_main(SCRIPT)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(bad_runs[case]))
    _assert_one_error_line(stop.value.code, capsys.readouterr().err, message)


def test_error_from_a_real_process(bad_runs: dict) -> None:
    """As a process: status 2 and the error line only (it comes before TensorFlow starts)."""
    result = _finish(_start(*bad_runs["no Age column"]))
    _assert_one_error_line(result.returncode, result.stderr, "missing column(s) Age")


def _fresh_pair(folder: Path, cycle: int, shape: tuple[int, int, int], width: float,
                seed: int) -> tuple[int, Path, Path]:
    """An untrained (encoder, classifier) pair of our architecture, saved as cycle `cycle`."""
    import keras

    from dqc.model import Architecture, build_models

    keras.utils.set_random_seed(seed)
    paths = [folder / f"tm_{part}_{cycle:03d}.keras" for part in ("encoder", "classifier")]
    for model, path in zip(build_models(shape, Architecture(width=width)), paths):
        model.save(path)
    return cycle, *paths


@pytest.mark.filterwarnings("ignore::dqc.metrics.MetricWarning")
def test_each_cycle_scores_as_its_own_model_loaded_whole(small_cohort: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    """A cycle of the same architecture as the model at hand has its weights loaded into
    it (no new model); one of another architecture is built anew; each cycle's scores are
    the bits of its own pair loaded whole. A pair that takes other volumes (same weights'
    shapes, another input shape) is still refused."""
    import dqc.checkpoint
    from dqc.checkpoint import load_models
    from dqc.data import load_table
    from dqc.inference import predict_cycles
    from dqc.model import stack
    from dqc.trainer import predict_in_batches
    from dqc.volumes import VolumeStore

    shape = (20, 24, 20)
    cycles = [_fresh_pair(tmp_path, 0, shape, 0.25, 1), _fresh_pair(tmp_path, 1, shape, 0.25, 2),
              _fresh_pair(tmp_path, 2, shape, 0.5, 3), _fresh_pair(tmp_path, 3, shape, 0.5, 4)]
    built = []
    monkeypatch.setattr(dqc.checkpoint, "load_models",
                        lambda *paths: built.append(paths) or load_models(*paths))
    _, predictions = predict_cycles(small_cohort["test"], cycles, verbose=False)
    assert [Path(e).name for e, _ in built] == ["tm_encoder_000.keras", "tm_encoder_002.keras"]
    table = load_table(small_cohort["test"], "inference")
    volumes = VolumeStore(table, shape, verbose=False).stacked(list(table.Subject))
    for cycle, encoder, classifier in cycles:
        alone = predict_in_batches(stack(*load_models(encoder, classifier)[:2]), volumes, 8)
        mine = predictions[predictions.cycle == cycle].score.to_numpy()
        np.testing.assert_array_equal(mine, alone.astype(np.float64))
    assert len({tuple(predictions[predictions.cycle == c].score) for c in range(4)}) == 4

    (tmp_path / "other").mkdir()
    other = _fresh_pair(tmp_path / "other", 1, (24, 24, 24), 0.25, 2)
    with pytest.raises(DQCError, match="takes 24x24x24 volumes, the models before it 20x24x20"):
        predict_cycles(small_cohort["test"], [cycles[0], other], verbose=False)
