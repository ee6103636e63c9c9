"""The authors' own model files (Keras 2 `.h5`, their layer names, a list input) work here.

Their pair is built the way `enc_PD_train_distributed.py` builds it (same layers and names,
`inputs=[inputA]`, one Adam per model, one training step, `model.save('....h5')`), in Keras 3;
their code is not a dependency. Volumes are 40x48x40: the smallest where their `valid`
average pool leaves a feature map (33 voxels a side or more).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from keras import layers

from dqc import authors
from dqc.checkpoint import load_trainer
from dqc.cli import run_main
from dqc.cohort import build_cohort

ROOT = Path(__file__).resolve().parents[1]
DIRTY = ROOT / "dirty_baselines" / "enc_PD_train_dirt_baseline.py"
QC = ROOT / "travelling_quality_control" / "enc_PD_quality_control.py"
INFERENCE = ROOT / "inference" / "inference_pd_distributed.py"
NAME = "distributed_BS5_09"


def authors_models(shape: tuple[int, int, int], filters=(32, 64, 128, 256, 256, 64),
                   inputs: int = 1) -> tuple[keras.Model, keras.Model]:
    """Their `sfcn` + `add_PD_layer`, compiled with one Adam each (shape is (z, y, x))."""
    given = [keras.Input((*shape, 1), name="InputA" if i == 0 else f"Input{i}")
             for i in range(inputs)]
    x = given[0] if inputs == 1 else layers.Concatenate()(given)
    for i, f in enumerate(filters[:5], 1):
        x = layers.Conv3D(f, (3, 3, 3), padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"norm{i}")(x)
        x = layers.MaxPool3D((2, 2, 2), strides=(2, 2, 2), padding="same", name=f"maxpool{i}")(x)
        x = layers.ReLU()(x)
    x = layers.Conv3D(filters[5], (1, 1, 1), padding="same", name="conv6")(x)
    x = layers.BatchNormalization(name="norm6")(x)
    x = layers.ReLU()(x)
    x = layers.Flatten(name="flat1")(layers.Dropout(.2)(layers.AveragePooling3D((2, 2, 2))(x)))
    encoder = keras.Model(inputs=given, outputs=[x])
    encoder.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4))
    features = keras.Input((encoder.outputs[0].shape[1],))
    classifier = keras.Model(features, layers.Dense(1, activation="sigmoid")(features))
    classifier.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4))
    return encoder, classifier


def their_train_step(encoder: keras.Model, classifier: keras.Model, x: np.ndarray,
                     y: np.ndarray) -> None:
    """Their `train_step`: one tape, each model's own optimizer applies its gradients."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        p = classifier(encoder(x, training=True), training=True)
        loss = keras.losses.BinaryCrossentropy()(y.reshape(-1, 1), p)
    grads = tape.gradient(loss, [encoder.trainable_weights, classifier.trainable_weights])
    encoder.optimizer.apply_gradients(zip(grads[0], encoder.trainable_weights))
    classifier.optimizer.apply_gradients(zip(grads[1], classifier.trainable_weights))


def their_volumes(table: pd.DataFrame, csv: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Their data generator: GetArrayFromImage (z, y, x) reshaped to the input shape."""
    return np.stack([np.float32(sitk.GetArrayFromImage(sitk.ReadImage(str(csv.parent / p)))
                                .reshape(*shape, 1)) for p in table.Path])


def _start(script: Path, *args: object, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Their pair saved as their script names it, and the three scripts run on it at once."""
    root = tmp_path_factory.mktemp("authors")
    cohort = build_cohort(root / "cohort", centers=2, n_train=10, n_val=6, n_test=4,
                          downsample=4, seed=0, verbose=False)
    train_csv, test_csv = Path(cohort["train"]), Path(cohort["test"])
    train = pd.read_csv(train_csv)
    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(train_csv.parent / train.Path[0]))).shape
    keras.utils.set_random_seed(1)
    encoder, classifier = authors_models(shape)
    their_train_step(encoder, classifier, their_volumes(train.head(5), train_csv, shape),
                     train.Group_bin.head(5).to_numpy(np.float32))
    folder = root / "models"
    folder.mkdir()
    encoder.save(folder / f"encoder_{NAME}.h5")
    classifier.save(folder / f"classifier_PD_{NAME}.h5")
    test = pd.read_csv(test_csv, dtype={"Subject": str})
    expected = classifier.predict(encoder.predict(their_volumes(test, test_csv, shape),
                                                  verbose=0), verbose=0).ravel()
    other, other_classifier = authors_models(shape, filters=(16, 64, 128, 256, 256, 64))
    other.save(root / "encoder_other.h5")
    other_classifier.save(root / "classifier_other.h5")
    en, pd_ = folder / f"encoder_{NAME}.h5", folder / f"classifier_PD_{NAME}.h5"
    procs = {  # the authors' README command lines, our output folders aside
        "dirty": _start(DIRTY, "-fn_train", train_csv, "-en", en, "-pd", pd_, "-cycles", 11,
                        "-epochs", 1, "-batch_size", 5, "--out", root / "dirty", "--quiet"),
        "qc": _start(QC, "-fn_train", train_csv, "-fn_test", cohort["val"], "-cycles", 11,
                     "-en", en, "-pd", pd_, "-revisit", 2, "-error", 0.02, "-fn_save", "qc",
                     "--out", root / "qc", "--quiet"),
        "qc_combined": _start(QC, "-fn_train", train_csv, "-fn_test", cohort["val"],
                              "-cycles", 11, "-en", en, "-pd", pd_, "--criterion", "combined",
                              "--out", root / "qc_combined", "--quiet"),
        "inference": _start(INFERENCE, "-fn", test_csv, "-en", f"{folder}/", "-pd", f"{folder}/",
                            "-o", "inf", cwd=root),
        "other": _start(INFERENCE, "-fn", test_csv, "-en", root / "encoder_other.h5",
                        "-pd", root / "classifier_other.h5", "-o", "other", cwd=root),
    }
    results = {k: (p.wait(timeout=600), *p.communicate()) for k, p in procs.items()}
    return {"root": root, "en": en, "pd": pd_, "expected": expected, "test": test,
            "shape": shape, "results": results, "encoder": encoder, "classifier": classifier}


def test_inference_predicts_what_their_model_predicts(setup: dict) -> None:
    rc, out, err = setup["results"]["inference"]
    assert rc == 0, err
    predictions = pd.read_csv(setup["root"] / "inf_predictions.csv", dtype={"Subject": str})
    assert list(predictions.Subject) == list(setup["test"].Subject)
    assert set(predictions.cycle) == {9}  # found by their file names in the folders
    np.testing.assert_allclose(predictions.score, setup["expected"], rtol=0, atol=1e-5)
    assert np.ptp(setup["expected"]) > 1e-4  # the images give different scores


@pytest.mark.parametrize("run, prefix", [("dirty", "dirty"), ("qc", "qc")])
def test_continues_one_cycle_with_their_optimizer(setup: dict, run: str, prefix: str) -> None:
    rc, out, err = setup["results"][run]
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("authors' model files"))
    assert f"input {'x'.join(map(str, setup['shape']))} (z, y, x)" in line
    assert "stored learning rate 0.0001" in line and "Adam state after 1 steps carried" in line
    written = setup["root"] / run / f"{prefix}_encoder_010.keras"
    assert written.is_file() and (setup["root"] / run / f"{prefix}_state_010.npz").is_file()
    before = authors.build_ours(authors.read_pair(setup["en"], setup["pd"]))[0].get_weights()
    after = keras.saving.load_model(written).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # it trained


def test_a_self_set_criterion_calibrates_itself_without_a_state_file(setup: dict) -> None:
    """Their files keep no batch losses: the batches' window comes from calibration batches
    at the cold start, each undone; the cost is in the summary and in one stderr line."""
    rc, out, err = setup["results"]["qc_combined"]
    assert rc == 0, err
    summary = json.loads((setup["root"] / "qc_combined" / "qc_summary.json").read_text())
    cost = summary["calibration"]
    assert cost["windows"]["train_loss:batch"] == {"pre-training": 0, "calibration": 10}
    assert [x for x in err.splitlines()
            if x.startswith("calibration: 10 steps (each undone), 0 evaluations")]
    # single images' window: only in a cycle that judged one image alone, from its own steps
    image = cost["windows"].get("check_rise:image")
    assert image is None or (cost["image_cycle"] == 10 and image["pre-training"] == 0
                             and 0 < image["calibration"] <= cost["evaluations"])


def test_other_architecture_is_one_error_line(setup: dict) -> None:
    rc, out, err = setup["results"]["other"]
    assert rc == 2 and "Traceback" not in err  # TensorFlow's start-up lines aside:
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    err = errors[0]
    assert "conv1: kernel (3, 3, 3, 1, 16), expected kernel (3, 3, 3, 1, 32)" in err


def test_two_input_model_is_one_error_line(setup: dict, tmp_path: Path, capsys) -> None:
    encoder, classifier = authors_models(setup["shape"], inputs=2)
    encoder.save(tmp_path / "encoder_two.h5")
    classifier.save(tmp_path / "classifier_two.h5")
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: load_trainer(tmp_path / "encoder_two.h5", tmp_path / "classifier_two.h5"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "expected the authors' SFCN encoder: one input" in err and "found 2 input(s)" in err


def test_conversion_is_exact_where_the_flatten_order_matters(tmp_path: Path) -> None:
    """At (z, y, x) = 100x100x36 their last map is 2x2x1: our rows must be reordered."""
    keras.utils.set_random_seed(3)
    shape = (100, 100, 36)
    encoder, classifier = authors_models(shape)
    rng = np.random.default_rng(0)
    zyx = rng.random((2, *shape, 1), np.float32) * np.array([1, 3], np.float32)[:, None, None,
                                                                                None, None]
    their_train_step(encoder, classifier, zyx, np.array([0, 1], np.float32))
    encoder.save(tmp_path / "e.h5")
    classifier.save(tmp_path / "c.h5")
    pair = authors.read_pair(tmp_path / "e.h5", tmp_path / "c.h5")
    assert pair.grid() == (2, 2, 1) and pair.our_shape == (36, 100, 100)
    ours = keras.Sequential(list(authors.build_ours(pair)))
    xyz = np.ascontiguousarray(zyx[..., 0].transpose(0, 3, 2, 1))[..., None]
    theirs = classifier.predict(encoder.predict(zyx, verbose=0), verbose=0)
    np.testing.assert_allclose(ours.predict(xyz, verbose=0), theirs, rtol=0, atol=1e-6)
    naive = keras.Sequential(list(authors.build_ours(pair)))  # without the row reordering
    naive.layers[1].get_layer("pd").set_weights(classifier.layers[-1].get_weights())
    assert not np.allclose(naive.predict(xyz, verbose=0), theirs, atol=1e-6)


def test_export_writes_their_layout(setup: dict, tmp_path: Path) -> None:
    """What their scripts' `tf.keras.models.load_model` reads: a Keras 2 `.h5` pair."""
    trainer, _ = load_trainer(setup["en"], setup["pd"])
    en, pd_ = authors.export_pair(trainer.encoder, trainer.classifier, tmp_path, NAME,
                                  trainer.optimizer)
    assert (en.name, pd_.name) == (f"encoder_{NAME}.h5", f"classifier_PD_{NAME}.h5")
    with h5py.File(en) as f:
        config = json.loads(f.attrs["model_config"])["config"]
        assert config["input_layers"] == [["InputA", 0, 0]]  # their inputs=[inputA]
        assert config["output_layers"] == [["flat1", 0, 0]]
        names = [n.decode() for n in f["model_weights"].attrs["layer_names"]]
        weighted = [n for n in names if f["model_weights"][n].attrs["weight_names"].size]
        assert weighted == [f"{k}{i}" for i in range(1, 7) for k in ("conv", "norm")]
        assert [n.decode() for n in f["model_weights/norm1"].attrs["weight_names"]] == [
            "norm1/gamma:0", "norm1/beta:0", "norm1/moving_mean:0", "norm1/moving_variance:0"]
        opt = [n.decode() for n in f["optimizer_weights"].attrs["weight_names"]]
        assert opt[:3] == ["Adam/iter:0", "Adam/conv1/kernel/m:0", "Adam/conv1/bias/m:0"]
        assert opt[25] == "Adam/conv1/kernel/v:0" and len(opt) == 1 + 2 * 24
        assert int(f["optimizer_weights/Adam/iter:0"][()]) == 1
    # Keras' own reader of Keras 2 .h5 files rebuilds their model: list input, same scores
    their_encoder = keras.saving.load_model(en, compile=False)
    their_classifier = keras.saving.load_model(pd_, compile=False)
    assert isinstance(their_encoder.input, list) and len(their_encoder.input) == 1
    x = np.random.default_rng(2).random((2, *setup["shape"], 1), np.float32)
    np.testing.assert_allclose(
        their_classifier.predict(their_encoder.predict(x, verbose=0), verbose=0),
        setup["classifier"].predict(setup["encoder"].predict(x, verbose=0), verbose=0),
        rtol=0, atol=1e-6)
    back = authors.read_pair(en, pd_)  # and back into ours: the same Adam moments
    original = authors.read_pair(setup["en"], setup["pd"])
    for slot in ("m", "v"):
        for key, array in original.encoder.moments[slot].items():
            np.testing.assert_allclose(back.encoder.moments[slot][key], array, atol=1e-9)
