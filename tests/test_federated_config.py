"""One install, one source of defaults: the wheel holds the federated code and the Flower app,
and the Flower app's run config says what the QC script's parser says."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dqc.cli import Parser, add_qc_flags
from dqc.criteria import CRITERIA
from dqc.errors import DQCError
from dqc.federated.loopback import APP_DIR
from dqc.federated.runconfig import NETWORK_DEFAULTS, config_from_args, server_config
from dqc.qc import combine, evaluate_predictions, tally

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"fn-train", "fn-test", "en", "pd", "cycles", "min-nodes"}  # no default to copy
#: The app's own choices, not the method's: where the server writes, and no progress bars in
#: a log that `flwr run --stream` relays line by line.
OWN = {"out", "quiet"}
#: Every criterion's parameters: run-config keys too (dqc.federated.runconfig)
CRITERION_KEYS = {p for kind in CRITERIA.values() for p in kind.parameter_names()}


def _qc_defaults() -> dict:
    parser = Parser()
    add_qc_flags(parser)
    args = parser.parse_args(["-fn_train", "t.csv", "-fn_test", "v.csv", "-cycles", "12",
                              "-en", "e.keras", "-pd", "c.keras"])
    return config_from_args(args)


def test_the_flower_run_config_has_the_qc_parsers_defaults():
    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    qc = _qc_defaults()
    for key, value in config.items():
        if key in NETWORK_DEFAULTS:
            assert value == NETWORK_DEFAULTS[key], key
        elif key in REQUIRED:
            assert not value, f"{key} must be given, not defaulted"
        elif key in CRITERION_KEYS:  # declared so that Flower takes an override; "" is unset
            assert value == "", f"{key}: a criterion parameter takes its criterion's default"
        elif key not in OWN:
            assert key in qc, f"{key} is not a QC flag"
            assert value == qc[key], key
    missing = (set(qc) | CRITERION_KEYS) - set(config) - {"fn-train"}
    assert not missing, f"QC flags the Flower app cannot set: {sorted(missing)}"


def test_a_criterion_key_left_empty_is_unset_and_one_given_is_checked():
    from dqc.federated.runconfig import read_config

    base = {"en": "e", "pd": "p", "cycles": 5, "min-nodes": 4, "error": "", "z": "",
            "alpha": "", "window": ""}
    assert not CRITERION_KEYS & set(read_config(base))
    assert read_config({**base, "window": 10})["window"] == 10
    with pytest.raises(DQCError, match="run config: z must be a number"):
        read_config({**base, "z": "three"})


def test_the_server_holds_no_validation_csv_when_the_centers_verify():
    class Args:  # the federated parser's values
        pass
    args = Args()
    vars(args).update({"fn_train": "t.csv", "fn_test": "v.csv", "verify_at": "centers"})
    assert "fn-test" not in server_config(args)
    args.verify_at = "server"
    assert server_config(args)["fn-test"] == "v.csv"


def test_the_wheel_holds_the_federated_code_and_the_flower_app(tmp_path: Path):
    source = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dqc", source / "dqc", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True,
                   capture_output=True)
    wheel, = tmp_path.glob("dqc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("dqc/federated/node.py", "dqc/federated/server.py", "dqc/federated/__main__.py",
                 "dqc/federated/app/pyproject.toml", "dqc/federated/app/dqc_app/server_app.py",
                 "dqc/federated/app/dqc_app/client_app.py", "dqc/defaults.py"):
        assert path in names, path
    assert APP_DIR.is_relative_to(Path(__import__("dqc").__file__).parent)


@pytest.mark.parametrize("detail", ["counts", "scores", "predictions"])
def test_the_centers_tallies_add_up_to_the_whole_sets_evaluation(detail: str):
    """Split the validation set into shares in any way: the same figures, bit for bit."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 61)
    scores = rng.random(61).astype(np.float32)
    whole = evaluate_predictions(y, scores)
    cuts = np.sort(rng.choice(np.arange(1, 61), 3, replace=False))
    shares = [tally(y[a:b], scores[a:b], detail) for a, b in zip([0, *cuts], [*cuts, 61])]
    parts = combine(shares)
    assert (parts.acc, parts.fp, parts.fn, parts.fpr, parts.fnr) == \
        (whole.acc, whole.fp, whole.fn, whole.fpr, whole.fnr)
    if detail == "counts":  # the paper's rule: nothing but counts travels
        assert np.isnan(parts.loss) and parts.pred == ""
    else:
        assert (parts.loss, parts.auroc) == (whole.loss, whole.auroc)
    if detail == "predictions":
        assert (parts.pred, parts.truth) == (whole.pred, whole.truth)
