"""The Keras backend: how it is chosen, the start line, and QC under JAX against TensorFlow.

The `jax` tests run in make test's second command (KERAS_BACKEND=jax pytest -m jax); the
cross-backend run starts one QC process per backend, so it needs both installed.
"""

from __future__ import annotations

import os
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
#: The runs compared: TensorFlow as installed, TensorFlow with its oneDNN optimisations off
#: (other convolution kernels, other rounding), JAX. Name -> (backend, TF_ENABLE_ONEDNN_OPTS).
RUNS = {"tensorflow": ("tensorflow", "1"), "tensorflow-onednn-off": ("tensorflow", "0"),
        "jax": ("jax", "1")}
#: Each compared with TensorFlow as installed.
OTHERS = ("tensorflow-onednn-off", "jax")
START, STOP = 3, 4


@pytest.fixture(scope="module")
def qc_runs(tmp_path_factory) -> dict:
    """A model pre-trained under TensorFlow (3 cycles of 2 epochs), then the same QC run
    (trainloss criterion, cycle 3, center C04's labels flipped) once per entry of RUNS, at
    once."""
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
    procs = {name: subprocess.Popen([sys.executable, str(QC_SCRIPT), "--backend", backend,
                                     *common, "--out", str(root / name)], cwd=ROOT,
                                    env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (backend, onednn) in RUNS.items()}
    val = pd.read_csv(built["val"])
    classes = (int((val.Group_bin == 0).sum()), int((val.Group_bin == 1).sum()))
    runs = {}
    for b, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        runs[b] = {"stderr": err, "log": pd.read_csv(root / b / "qc.csv", keep_default_na=False,
                                                     dtype={"Subject": str}),
                   "images": pd.read_csv(root / b / "qc_images.csv", dtype={"Subject": str}),
                   "classes": classes}
    return runs


@pytest.mark.jax
@UNDER_JAX
@pytest.mark.parametrize("name", RUNS)
def test_each_run_names_its_backend_device_and_precision(qc_runs, name):
    lines = [x for x in qc_runs[name]["stderr"].splitlines() if x.startswith("backend: ")]
    assert len(lines) == 1 and lines[0].startswith(f"backend: {RUNS[name][0]} on ")
    assert lines[0].endswith(", float32")


#: A decision is asserted only where the statistic is this many times its limit (or the limit
#: this many times the statistic): each backend draws its own dropout masks from the same seed,
#: so a batch's own training loss differs between them by up to ~10% (measured: C04's batch
#: 4.00 nats under TensorFlow, 4.42 under JAX), and convolutions round differently per CPU.
MARGIN = 2.0


def _batch_rows(log: pd.DataFrame) -> pd.DataFrame:
    """The regular pass's batches: the same sequence under both backends (the batches of one
    cycle depend on the seed only), whatever extra single-image rows a near call adds."""
    batches = log[log.Subject == "batch"].reset_index(drop=True)
    return batches.assign(ratio=batches.STATISTIC.astype(float) / batches.LIMIT.astype(float))


def clear_decisions_agree(tf: pd.DataFrame, jx: pd.DataFrame) -> list[str]:
    """Where either run's statistic is MARGIN times beyond or within its limit, both runs
    decided the same; what differs is returned (empty when they agree)."""
    a, b = _batch_rows(tf), _batch_rows(jx)
    if list(a.Study) != list(b.Study):
        return [f"batch sequences differ: {list(a.Study)} vs {list(b.Study)}"]
    clear = (a.ratio > MARGIN) | (a.ratio < 1 / MARGIN) | (b.ratio > MARGIN) | (b.ratio < 1 / MARGIN)
    differ = clear & (a.Ignored != b.Ignored)
    return [f"batch {i} at {a.Study[i]}: tensorflow Ignored={a.Ignored[i]} (statistic/limit "
            f"{a.ratio[i]:.2f}), other Ignored={b.Ignored[i]} ({b.ratio[i]:.2f})"
            for i in differ[differ].index]


@pytest.mark.jax
@UNDER_JAX
@pytest.mark.parametrize("other", OTHERS)
def test_same_decisions_where_the_case_leaves_a_margin(qc_runs, other):
    """C04's labels are flipped: its batch's own loss is far beyond the limit in every run,
    so each undoes it, retries its four images alone and flags each. Clean batches far
    below the limit are kept by all; a clean batch near the limit may go either way, and
    then adds five single-image rows of its own (so logs are not compared row for row)."""
    tf, jx = qc_runs["tensorflow"], qc_runs[other]
    assert clear_decisions_agree(tf["log"], jx["log"]) == []
    for run in (tf, jx):
        batches = _batch_rows(run["log"])
        c04 = batches[batches.Study == "C04"]
        assert len(c04) == 1 and c04.Ignored.iloc[0] == 1 and c04.ratio.iloc[0] > MARGIN
        assert (batches[batches.Study != "C04"].ratio < 1 / MARGIN).sum() >= 2
        images = run["images"].set_index("Subject")
        harmful = images[images.Study == "C04"]
        assert len(harmful) == 4 and (harmful.times_flagged == 1).all()
    # the same C04 images flagged, in the same cycle, waiting for the same revisit
    c04_tf = tf["images"][tf["images"].Study == "C04"].reset_index(drop=True)
    c04_jx = jx["images"][jx["images"].Study == "C04"].reset_index(drop=True)
    pd.testing.assert_frame_equal(c04_jx, c04_tf)


@pytest.mark.jax
@UNDER_JAX
@pytest.mark.parametrize("other", OTHERS)
def test_figures_differ_only_as_far_as_floats_and_dropout_draws_allow(qc_runs, other):
    """The loaded model's validation figures agree to float rounding (measured: 4e-7 nats):
    a score within rounding of 0.5 may cross it (one FP or FN more or less) and two scores
    within rounding of each other may swap (one pair of the AUROC's n_hc * n_pd).
    Training losses are not compared: each backend draws its own dropout masks from the same
    seed (measured: C04's batch 4.00 nats under TensorFlow, 4.42 under JAX); what keeps the
    decisions equal is the margin, asserted here for both."""
    tf, jx = qc_runs["tensorflow"]["log"], qc_runs[other]["log"]
    base_tf, base_jx = tf.iloc[0], jx.iloc[0]
    n_hc, n_pd = qc_runs[other]["classes"]
    assert abs(float(base_jx.VAL_LOSS) - float(base_tf.VAL_LOSS)) < 1e-5
    for column in ("FP", "FN"):
        assert abs(float(base_jx[column]) - float(base_tf[column])) <= 1, column
    assert abs(float(base_jx.VAL_AUROC) - float(base_tf.VAL_AUROC)) <= 1 / (n_hc * n_pd) + 1e-12
    for log in (tf, jx):
        batches = log[log.Subject == "batch"]
        loss = batches.TRAIN_LOSS.astype(float)
        assert loss[batches.Study == "C04"].min() > 10 * loss[batches.Study != "C04"].max()


def test_the_margin_check_catches_a_clear_disagreement_and_forgives_a_near_call():
    """The cross-backend check on crafted logs (the figures of a measured run: C04's batch
    18x its limit, C02's 0.8x, the others under 0.2x)."""
    def log(ignored: list[int], ratios: list[float]) -> pd.DataFrame:
        studies = ["C01", "C01", "C02", "C03", "C04"]
        return pd.DataFrame({"Subject": ["n/a"] + ["batch"] * 5, "Study": ["n/a"] + studies,
                             "Ignored": [0] + ignored, "STATISTIC": [float("nan")] + ratios,
                             "LIMIT": [float("nan")] + [1.0] * 5})
    tf = log([0, 0, 0, 0, 1], [0.08, 0.19, 0.81, 0.15, 17.96])
    assert clear_decisions_agree(tf, log([0, 0, 0, 0, 1], [0.25, 0.2, 0.72, 0.08, 14.1])) == []
    assert clear_decisions_agree(tf, log([0, 0, 1, 0, 1], [0.25, 0.2, 1.1, 0.08, 14.1])) == []
    kept = clear_decisions_agree(tf, log([0, 0, 0, 0, 0], [0.25, 0.2, 0.72, 0.08, 14.1]))
    assert kept == ["batch 4 at C04: tensorflow Ignored=1 (statistic/limit 17.96), other "
                    "Ignored=0 (14.10)"]
    assert len(clear_decisions_agree(tf, log([0, 0, 0, 1, 1], [0.25, 0.2, 0.72, 0.08, 14.1])))
    other_batches = log([0, 0, 0, 0, 1], [0.25, 0.2, 0.72, 0.08, 14.1]).drop(index=2)
    assert clear_decisions_agree(tf, other_batches)[0].startswith("batch sequences differ")
