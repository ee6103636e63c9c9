"""The Keras backend: how it is chosen, the start line, and QC under JAX against TensorFlow.

The `jax` tests run in make test's second command (KERAS_BACKEND=jax pytest -m jax); the
cross-backend run starts one QC process per backend, so it needs both installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import pandas as pd
import pytest

from helpers import QC_SCRIPT, ROOT, SCRIPT

from dqc.cohort import build_cohort
from dqc.errors import DQCError
from dqc.runtime import BACKEND_FILE, choose_backend, requested_backend


# --- the choice (pure) -------------------------------------------------------------------------

def test_flag_beats_environment_beats_setup_file_beats_tensorflow(tmp_path):
    env = {"KERAS_BACKEND": "torch"}
    assert requested_backend([], {}, tmp_path) == ("tensorflow", "default")
    (tmp_path / BACKEND_FILE).write_text("jax\n")
    assert requested_backend([], {}, tmp_path) == ("jax", str(tmp_path / BACKEND_FILE))
    assert requested_backend([], env, tmp_path) == ("torch", "KERAS_BACKEND")
    assert requested_backend(["-x", "1", "--backend", "jax"], env, tmp_path) == ("jax",
                                                                                 "--backend")
    assert requested_backend(["--backend=tensorflow"], env, tmp_path)[0] == "tensorflow"
    assert requested_backend(["--", "--backend", "jax"], env, tmp_path)[0] == "torch"


def test_unknown_missing_or_too_late_backends_are_refused(monkeypatch):
    with pytest.raises(DQCError, match=r"unknown Keras backend 'nosuch' \(from --backend\)"):
        choose_backend(["--backend", "nosuch"])
    with pytest.raises(DQCError, match="--backend needs a value"):
        choose_backend(["--backend"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DQCError, match=r"'jax' \(from --backend\) is not installed; make setup"):
        choose_backend(["--backend", "jax"])
    monkeypatch.undo()
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    with pytest.raises(DQCError, match=f"Keras already started with {keras.backend.backend()}"):
        choose_backend(["--backend", other])


def test_a_backend_that_cannot_start_is_one_error_line_before_keras(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--backend", "nosuch", "-fn_train",
                           "x.csv", "-cycles", "1", "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: unknown Keras backend 'nosuch' (from "
                                        "--backend); choose one of tensorflow, jax, torch"]
    assert not (tmp_path / "o").exists()


# --- QC under JAX and under TensorFlow ---------------------------------------------------------

UNDER_JAX = pytest.mark.skipif(keras.backend.backend() != "jax",
                               reason="runs under KERAS_BACKEND=jax (make test, 2nd command)")
BACKENDS = ("tensorflow", "jax")
START, STOP = 3, 4


@pytest.fixture(scope="module")
def qc_runs(tmp_path_factory) -> dict:
    """A model pre-trained under TensorFlow (3 cycles of 2 epochs), then the same QC run
    (trainloss criterion, cycle 3, center C04's labels flipped) once per backend, at once."""
    root = tmp_path_factory.mktemp("backends")
    built = build_cohort(root / "cohort", verbose=False, centers=4, n_train=24, n_val=12,
                         n_test=6, downsample=8, seed=0, effect=0.9)
    subprocess.run([sys.executable, str(SCRIPT), "--backend", "tensorflow", "-fn_train",
                    str(built["train"]), "-cycles", str(START), "-epochs", "2", "--out",
                    str(root / "pre"), "--quiet"], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    train = pd.read_csv(built["train"], dtype={"Subject": str}).sort_values("Study",
                                                                            kind="stable")
    train["Path"] = [str((Path(built["train"]).parent / p).resolve()) for p in train.Path]
    flipped = train.Study == "C04"
    train.loc[flipped, "Group_bin"] = 1 - train.loc[flipped, "Group_bin"]
    train.to_csv(root / "train.csv", index=False)
    last = f"{START - 1:03d}"
    common = ["-fn_train", str(root / "train.csv"), "-fn_test", str(built["val"]),
              "-en", str(root / "pre" / f"tm_encoder_{last}.keras"),
              "-pd", str(root / "pre" / f"tm_classifier_{last}.keras"),
              "--start-cycle", str(START), "-cycles", str(STOP), "-revisit", "1",
              "--criterion", "trainloss", "-fn_save", "qc", "--quiet"]
    procs = {b: subprocess.Popen([sys.executable, str(QC_SCRIPT), "--backend", b, *common,
                                  "--out", str(root / b)], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for b in BACKENDS}
    runs = {}
    for b, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        runs[b] = {"stderr": err, "log": pd.read_csv(root / b / "qc.csv", keep_default_na=False,
                                                     dtype={"Subject": str}),
                   "images": pd.read_csv(root / b / "qc_images.csv", dtype={"Subject": str})}
    return runs


@pytest.mark.jax
@UNDER_JAX
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_run_names_its_backend_device_and_precision(qc_runs, backend):
    lines = [x for x in qc_runs[backend]["stderr"].splitlines() if x.startswith("backend: ")]
    assert len(lines) == 1 and lines[0].startswith(f"backend: {backend} on ")
    assert lines[0].endswith(", float32")


@pytest.mark.jax
@UNDER_JAX
def test_jax_makes_tensorflows_decisions(qc_runs):
    tf, jx = (qc_runs[b] for b in BACKENDS)
    decisions = ["Cycle", "Subject", "Study", "Ignored"]
    pd.testing.assert_frame_equal(jx["log"][decisions], tf["log"][decisions])
    pd.testing.assert_frame_equal(jx["images"], tf["images"])
    flagged = tf["log"][tf["log"].Ignored == 1]
    # its batch, then some of its 4 images alone: one image is judged against the single
    # images' own window (near ln 2, BatchNorm over one image), so not each by construction
    assert set(flagged.Study) == {"C04"} and flagged.Subject.iloc[0] == "batch"
    assert len(tf["log"]) == 1 + 5 + 4  # the baseline, five batches, four single images


@pytest.mark.jax
@UNDER_JAX
def test_figures_differ_only_as_far_as_floats_and_dropout_draws_allow(qc_runs):
    """The loaded model's validation figures agree to float rounding (measured: 4e-7 nats).
    Training losses are not compared: each backend draws its own dropout masks from the same
    seed (measured: C04's batch 4.00 nats under TensorFlow, 4.42 under JAX); what keeps the
    decisions equal is the margin, asserted here under both."""
    tf, jx = (qc_runs[b]["log"] for b in BACKENDS)
    base_tf, base_jx = tf.iloc[0], jx.iloc[0]
    for column in ("ACC", "FP", "FN", "VAL_AUROC"):
        assert base_jx[column] == base_tf[column], column
    assert abs(float(base_jx.VAL_LOSS) - float(base_tf.VAL_LOSS)) < 1e-5
    for log in (tf, jx):
        batches = log[log.Subject == "batch"]
        loss = batches.TRAIN_LOSS.astype(float)
        assert loss[batches.Study == "C04"].min() > 10 * loss[batches.Study != "C04"].max()
