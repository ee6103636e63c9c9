"""Bad QC input is refused before any training, in one line, with exit status 2."""

import pandas as pd
import pytest
from helpers import QC_SCRIPT, call_script


def run_qc(argv, capsys, tmp_path):
    run = call_script(argv, capsys, tmp_path, script_path=QC_SCRIPT)
    return run.returncode, run.stdout, run.stderr


@pytest.fixture()
def args(cohort, tmp_path):
    def make(val=None, **flags):
        base = {"-fn_train": str(cohort["train"]), "-fn_test": str(val or cohort["val"]),
                "-cycles": "12", "-en": str(tmp_path / "none.keras"),
                "-pd": str(tmp_path / "none.keras"), "-revisit": "2", "-error": "0.02",
                "--out": str(tmp_path / "out"), "--quiet": None}
        base.update(flags)
        return [x for k, v in base.items() for x in ((k,) if v is None else (k, v))]
    return make


@pytest.mark.parametrize("flags, message", [
    ({"-revisit": "0"}, "-revisit must be at least 1"),
    ({"-error": "-0.1"}, "-error must be 0 or more"),
    ({"-cycles": "10"}, "must be greater than the start cycle 10"),
])
def test_bad_flags(args, capsys, flags, message, tmp_path):
    code, out, err = run_qc(args(**flags), capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_single_class_validation_set(args, capsys, cohort, tmp_path):
    val = pd.read_csv(cohort["val"])
    one = tmp_path / "val.csv"
    val[val.Group_bin == 1].assign(Path=lambda t: [str(cohort["val"].parent / p) for p in t.Path]
                                   ).to_csv(one, index=False)
    code, out, err = run_qc(args(val=one), capsys, tmp_path)
    assert code == 2 and "both classes" in err and "Traceback" not in err


def test_overlap_and_small_validation_set_are_warned(args, capsys, cohort, tmp_path):
    train = pd.read_csv(cohort["train"])
    both = tmp_path / "val.csv"
    pd.concat([pd.read_csv(cohort["val"]), train.head(2)]).assign(
        Path=lambda t: [str(cohort["val"].parent / p) for p in t.Path]).to_csv(both, index=False)
    code, out, err = run_qc(args(val=both), capsys, tmp_path)
    assert code == 2 and "none.keras" in err  # gets as far as loading the model
    assert "2 image(s) are in both" in out and train.Subject[0] in out
    assert "validation set too small for -error 0.02" in out
