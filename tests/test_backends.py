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
#: so an update's own training loss differs between them by up to ~10% (measured: C04's batch
#: 4.00 nats under TensorFlow, 4.42 under JAX), and convolutions round differently per CPU.
MARGIN = 2.0


def _keyed(log: pd.DataFrame) -> pd.DataFrame:
    """The updates of a log, each keyed by cycle, center, subject ("batch" or the image) and
    its occurrence, with statistic / limit: the regular pass's batches come in the same
    sequence in every run (the batches of one cycle depend on the seed only); a near call
    adds single-image rows of its own, which then have no partner."""
    rows = log[log.Subject != "n/a"].copy()
    rows["n"] = rows.groupby(["Cycle", "Study", "Subject"]).cumcount()
    rows["ratio"] = (pd.to_numeric(rows.STATISTIC, errors="coerce")
                     / pd.to_numeric(rows.LIMIT, errors="coerce"))
    return rows.set_index(["Cycle", "Study", "Subject", "n"])


def clear_decisions_agree(tf: pd.DataFrame, jx: pd.DataFrame) -> list[str]:
    """Where either run's statistic is MARGIN times beyond or within its limit, both runs
    decided the same; what differs is returned (empty when they agree)."""
    a, b = _keyed(tf), _keyed(jx)
    batches = [list(x[x.index.get_level_values("Subject") == "batch"].index.get_level_values(
        "Study")) for x in (a, b)]
    if batches[0] != batches[1]:
        return [f"batch sequences differ: {batches[0]} vs {batches[1]}"]
    both = a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")
    far = lambda r: (r > MARGIN) | (r < 1 / MARGIN)  # noqa: E731
    differ = both[(far(both.ratio_a) | far(both.ratio_b)) & (both.Ignored_a != both.Ignored_b)]
    return [f"{subject} at {study} (cycle {cycle}): tensorflow Ignored={int(r.Ignored_a)} "
            f"(statistic/limit {r.ratio_a:.2f}), other Ignored={int(r.Ignored_b)} "
            f"({r.ratio_b:.2f})"
            for (cycle, study, subject, _), r in differ.iterrows()]


@pytest.mark.jax
@UNDER_JAX
@pytest.mark.parametrize("other", OTHERS)
def test_same_decisions_where_the_case_leaves_a_margin(qc_runs, other):
    """C04's labels are flipped: its batch's own loss is far beyond the limit in every run,
    so each undoes it and retries its four images alone. Clean batches far below the limit
    are kept by all. A clean batch near the limit may go either way (and then adds five
    single-image rows of its own), and so may one image alone, judged against the single
    images' own window (its own loss is near ln 2 whatever the image: BatchNorm over one
    image); so logs are not compared row for row, and no image's fate is asserted."""
    tf, jx = qc_runs["tensorflow"], qc_runs[other]
    assert clear_decisions_agree(tf["log"], jx["log"]) == []
    for run in (tf, jx):
        updates = _keyed(run["log"]).reset_index()
        batches = updates[updates.Subject == "batch"]
        c04 = batches[batches.Study == "C04"]
        assert len(c04) == 1 and c04.Ignored.iloc[0] == 1 and c04.ratio.iloc[0] > MARGIN
        assert (batches[batches.Study != "C04"].ratio < 1 / MARGIN).sum() >= 2
        alone = updates[(updates.Study == "C04") & (updates.Subject != "batch")]
        assert sorted(alone.Subject) == sorted(run["images"].Subject[run["images"].Study == "C04"])


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
    """The cross-run check on crafted logs (the figures of a measured run: C04's batch 18x its
    limit, C02's 0.8x, the others under 0.2x; then C04's images alone)."""
    def log(ignored: list[int], ratios: list[float], alone: dict[str, tuple[int, float]] = {}
            ) -> pd.DataFrame:
        studies = ["C01", "C01", "C02", "C03", "C04"] + ["C04"] * len(alone)
        return pd.DataFrame({"Cycle": [0] + [3] * len(studies),
                             "Subject": ["n/a"] + ["batch"] * 5 + list(alone),
                             "Study": ["n/a"] + studies,
                             "Ignored": [0] + ignored + [i for i, _ in alone.values()],
                             "STATISTIC": [float("nan")] + ratios + [r for _, r in alone.values()],
                             "LIMIT": [float("nan")] + [1.0] * len(studies)})
    tf = log([0, 0, 0, 0, 1], [0.08, 0.19, 0.81, 0.15, 17.96], {"a": (1, 3.0), "b": (0, 0.9)})
    same = {"a": (1, 2.5), "b": (1, 1.05)}  # b: a near call
    assert clear_decisions_agree(tf, log([0, 0, 0, 0, 1], [0.25, 0.2, 0.72, 0.08, 14.1], same)) == []
    assert clear_decisions_agree(tf, log([0, 0, 1, 0, 1], [0.25, 0.2, 1.1, 0.08, 14.1], same)) == []
    kept = clear_decisions_agree(tf, log([0, 0, 0, 0, 0], [0.25, 0.2, 0.72, 0.08, 14.1]))
    assert kept == ["batch at C04 (cycle 3): tensorflow Ignored=1 (statistic/limit 17.96), "
                    "other Ignored=0 (14.10)"]
    missed = clear_decisions_agree(tf, log([0, 0, 0, 0, 1], [0.25, 0.2, 0.72, 0.08, 14.1],
                                           {"a": (0, 0.4), "b": (0, 0.9)}))
    assert missed == ["a at C04 (cycle 3): tensorflow Ignored=1 (statistic/limit 3.00), other "
                      "Ignored=0 (0.40)"]
    assert len(clear_decisions_agree(tf, log([0, 0, 0, 1, 1], [0.25, 0.2, 0.72, 0.08, 14.1])))
    other_batches = log([0, 0, 0, 0, 1], [0.25, 0.2, 0.72, 0.08, 14.1]).drop(index=2)
    assert clear_decisions_agree(tf, other_batches)[0].startswith("batch sequences differ")
