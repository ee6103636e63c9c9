"""What the tests share besides fixtures: paths, the tiny cohort's settings, running a script
(in this process or as a subprocess), a pre-trained tiny cohort, and comparing QC outputs."""

from __future__ import annotations

import functools
import json
import os
import runpy
import subprocess
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.cohort import build_cohort
from dqc.runs import RunSpec, train_cycles

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = ROOT / "standard_travelling_model"
SCRIPT = SCRIPT_DIR / "enc_PD_train_distributed.py"
TINY = dict(centers=4, n_train=24, n_val=12, n_test=8, downsample=8, seed=0)
SHAPE = (20, 24, 20)
MODEL_SUFFIXES = (".keras", ".npz", ".h5")
QC_SCRIPT = ROOT / "travelling_quality_control" / "enc_PD_quality_control.py"


# --- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BadCase:
    """A broken input: the CSV to give and a regex its one-line error must match.

    A `fine` case is merely unusual: it must run, and `message` is then a regex its one-line
    warning must match ("" when it runs silently).
    """

    csv: Path
    message: str        # regex the error message must contain
    table_error: bool   # True: load_table itself rejects it; False: only reading images does
    fine: bool = False


# --- a pre-trained tiny cohort ---------------------------------------------------------------

def pretrained(root: Path, cycles: int = 1, epochs: int = 1, batch_size: int = 5,
               **cohort: object) -> dict:
    """Build a cohort in root/cohort and train cycles 0..cycles-1 into root/pre (prefix tm)."""
    params = dict(centers=6, n_train=24, n_val=12, n_test=6, downsample=8, seed=0)
    params.update(cohort)
    built = build_cohort(root / "cohort", verbose=False, **params)
    train_cycles(RunSpec(train_csv=str(built["train"]), out=str(root / "pre"), prefix="tm",
                         cycles=range(0, cycles), seed=40, epochs=epochs,
                         batch_size=batch_size, verbose=False, echo=lambda line: None))
    last = cycles - 1
    return {**built, "encoder": root / "pre" / f"tm_encoder_{last:03d}.keras",
            "classifier": root / "pre" / f"tm_classifier_{last:03d}.keras", "start": cycles}


# --- script runs -------------------------------------------------------------------------------

@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    def model_files(self) -> list[Path]:
        if not self.out.exists():
            return []
        return sorted(p for p in self.out.rglob("*") if p.suffix in MODEL_SUFFIXES)

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_script(args: list[str], cwd: Path, out: Path, script: str | Path = SCRIPT,
               timeout: float = 300) -> ScriptRun:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return ScriptRun(done.returncode, done.stdout, done.stderr, out)


@functools.lru_cache(maxsize=4)
def _script_globals(script: Path = SCRIPT) -> dict:
    """A script's module namespace (loaded once, not run as __main__)."""
    return runpy.run_path(str(script), run_name="script_under_test")


def call_script(argv: list[str], capsys: pytest.CaptureFixture, out: Path,
                script_path: Path = SCRIPT) -> ScriptRun:
    """Run the script's entry point in this process, exactly as `__main__` does.

    `run_main(main)` always ends in `sys.exit`; the exit status, stdout and stderr come back
    like a subprocess's, without paying for another TensorFlow import.
    """
    script = _script_globals(script_path)
    saved = warnings.showwarning  # run_main installs a one-line warning printer
    try:
        with pytest.raises(SystemExit) as info:
            script["run_main"](lambda: script["main"](argv))
    finally:
        warnings.showwarning = saved
    captured = capsys.readouterr()
    code = info.value.code
    return ScriptRun(0 if code is None else int(code), captured.out, captured.err, out)


class ScriptRuns:
    """Named script runs, all started in a small thread pool; `get(name)` waits for one."""

    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._runs: dict[str, Future] = {}

    def submit(self, name: str, args: list[str], cwd: Path, out: Path,
               script: str | Path = SCRIPT) -> None:
        self._runs[name] = self._pool.submit(run_script, args, cwd, out, script)

    def get(self, name: str) -> ScriptRun:
        return self._runs[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


#: Bad inputs also checked through a real subprocess (all of them are checked in-process
#: through the script's `main`; a subprocess costs ~7 s of CPU for the TensorFlow import).
SUBPROCESS_BAD_CASES = ("corrupt_image",)


# --- QC outputs --------------------------------------------------------------------------------

#: The log's validation figures: computed from scores predicted in other batches when the
#: centers verify (each its own share), so they agree to float rounding, not bit for bit,
#: wherever a kernel's rounding depends on the batch (TensorFlow without oneDNN: 4e-9 nats
#: measured; with oneDNN on an AVX2-only CPU: 3e-8 nats); every decision and count is
#: compared exactly.
FIGURES = ["VAL_LOSS", "VAL_AUROC"]
#: What is computed from them: a rise of the validation loss (a difference of two losses, so
#: its relative error is large where the rise is small) and a limit from a window of rises
#: (median + z * 1.4826 * MAD: at most (1 + 2 * 1.4826 * z) times a rise's error, under 20x
#: for z <= 6). Compared to 2 * 20 * FIGURES' relative tolerance of the largest loss.
DERIVED = ["STATISTIC", "LIMIT"]
RTOL = 1e-6


def assert_same_qc_outputs(expected: Path, actual: Path, last_cycle: int) -> pd.DataFrame:
    """Decisions, counts, per-image table, summary, models and optimizer state are
    identical, the validation figures equal to 1e-6 (`FIGURES`); returns the log."""
    import keras

    log = pd.read_csv(expected / "qc.csv", keep_default_na=False)
    other = pd.read_csv(actual / "qc.csv", keep_default_na=False)
    figures = [c for c in FIGURES + DERIVED if c in log.columns]
    pd.testing.assert_frame_equal(other.drop(columns=figures), log.drop(columns=figures))
    loss_scale = float(np.nanmax(pd.to_numeric(log.get("VAL_LOSS", pd.Series([0.0])))))
    for column in figures:
        tolerance = dict(rtol=0, atol=2 * 20 * RTOL * loss_scale) if column in DERIVED \
            else dict(rtol=RTOL, atol=0)
        np.testing.assert_allclose(pd.to_numeric(other[column]), pd.to_numeric(log[column]),
                                   err_msg=column, **tolerance)
    pd.testing.assert_frame_equal(pd.read_csv(actual / "qc_images.csv"),
                                  pd.read_csv(expected / "qc_images.csv"))
    summaries = [json.loads((d / "qc_summary.json").read_text()) for d in (actual, expected)]
    for summary in summaries:  # a wall-clock time, not a decision
        summary.get("calibration", {}).pop("seconds", None)
    assert summaries[0] == summaries[1]
    for part in ("encoder", "classifier"):
        a, b = (keras.saving.load_model(d / f"qc_{part}_{last_cycle:03d}.keras", compile=False)
                for d in (expected, actual))
        assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    a, b = (np.load(d / f"qc_state_{last_cycle:03d}.npz") for d in (expected, actual))
    assert all(np.array_equal(a[k], b[k]) for k in a.files if k.startswith("v"))
    return log


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> its bytes): what a stopped run must leave
    exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}
