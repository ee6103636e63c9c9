"""The dirty baseline continues the pre-trained model on data with harmful images, no QC."""

import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import ROOT

from dqc.harmful import build_scenario

SCRIPT = ROOT / "dirty_baselines" / "enc_PD_train_dirt_baseline.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained_one):
    root = tmp_path_factory.mktemp("dirty")
    cohort = pretrained_one
    dirty_csv = build_scenario(cohort["train"], root / "scenario", whole_centers=1,
                               types=["inverted"], seed=0, verbose=False)
    # the authors' README command line, paths aside (the pre-trained model ends at cycle 9
    # there; here at cycle 0, so --start-cycle 1 would match; -cycles 12 trains 10 and 11)
    common = ["-en", str(cohort["encoder"]), "-pd", str(cohort["classifier"]),
              "-cycles", "12", "-epochs", "1", "-batch_size", "5"]
    procs = {name: subprocess.Popen([sys.executable, str(SCRIPT), "-fn_train", str(csv), *common,
                                     "--out", str(root / name), "--quiet"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, csv in (("dirty", dirty_csv), ("clean", cohort["train"]))}
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    return root, results


def weights(folder, cycle):
    return [w for part in ("encoder", "classifier")
            for w in keras.saving.load_model(folder / f"dirty_{part}_{cycle:03d}.keras")
            .get_weights()]


def test_writes_the_expected_files_and_lines(runs):
    root, results = runs
    for name, (code, out, err) in results.items():
        assert code == 0, err
        assert [line.split()[1] for line in out.splitlines() if line.startswith("cycle")] == \
            ["10", "11"]
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == sorted(f"dirty_{part}_{c:03d}.{ext}" for c in (10, 11)
                               for part, ext in (("classifier", "keras"), ("encoder", "keras"),
                                                 ("state", "npz")))


def test_weights_differ_from_a_clean_continuation(runs):
    root, _ = runs
    dirty, clean = weights(root / "dirty", 11), weights(root / "clean", 11)
    assert len(dirty) == len(clean)
    assert not all(np.array_equal(a, b) for a, b in zip(dirty, clean))
