"""The malformed-input corpus through every entry point that reads it.

Each case (conftest `malformed_cases`) ends in a correct run or in one `error:` line with exit
status 2, no traceback and nothing written; no training step ever sees a non-finite value.
The scripts run in this process through their `main` (`call_script`): a refused case costs
milliseconds, because the image check runs before any training.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, SCRIPT, BadCase, ScriptRun, call_script
from dqc.errors import DQCError
from dqc.runs import RunSpec, train_cycles
from dqc.trainer import Trainer
from helpers import QC_SCRIPT

DIRTY = ROOT / "dirty_baselines" / "enc_PD_train_dirt_baseline.py"
INFERENCE = ROOT / "inference" / "inference_pd_distributed.py"
GENERATOR = ROOT / "generate_harmful_samples" / "generate_data.py"
ENTRY_POINTS = ("standard", "dirty", "qc_train", "qc_test", "inference", "generator", "node")
#: The cases that also run through the training entry points one by one; the other fine
#: cases run there together in one messy-but-fine CSV (`test_all_fine_defects_at_once`).
TRAINED_ONE_BY_ONE: tuple[str, ...] = ()  # each costs ~25 s of training on 2 cores


@pytest.fixture(scope="module")
def pre(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cycle 0 of a model on the tiny cohort: what dirty, QC and inference continue from."""
    out = tmp_path_factory.mktemp("corpus_pre")
    train_cycles(RunSpec(train_csv=str(cohort["train"]), out=str(out), prefix="tm",
                         cycles=range(0, 1), seed=1, verbose=False, echo=lambda line: None))
    return out


@pytest.fixture()
def finite_steps(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each training step's batch was finite (records every `Trainer.train_step`)."""
    seen: list[bool] = []
    step = Trainer.train_step

    def checked(self, x, y):
        seen.append(bool(np.isfinite(np.asarray(x)).all()))
        return step(self, x, y)
    monkeypatch.setattr(Trainer, "train_step", checked)
    return seen


def _node(csv: Path, out: Path, capsys: pytest.CaptureFixture) -> ScriptRun:
    """The federated node's data loading, in process: its CSV, image shape and image store."""
    from dqc.federated.node import CenterNode

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            node = CenterNode(csv)
            _, store = node.ready()
            ok = np.isfinite(store.batch(sorted(node.ids))).all()
            code, err = (0, "") if ok else (1, "non-finite batch")
        except DQCError as exc:
            code, err = 2, f"error: {exc}\n"
    shown = "".join(f"warning: {w.message}\n" for w in caught)
    return ScriptRun(code, "", capsys.readouterr().err + shown + err, out)


def run_entry(entry: str, csv: Path, out: Path, pre: Path, cohort: dict,
              capsys: pytest.CaptureFixture) -> ScriptRun:
    """Give `csv` to one entry point (the way a user would), writing into `out`."""
    model = ["-en", str(pre / "tm_encoder_000.keras"), "-pd", str(pre / "tm_classifier_000.keras")]
    common = ["--out", str(out), "--quiet"]
    qc = [*model, "-cycles", "2", "--start-cycle", "1", "-revisit", "1", "-error", "0.5",
          *common]
    argv: dict[str, tuple[list[str], Path]] = {
        "standard": (["-fn_train", str(csv), "-cycles", "1", *common], SCRIPT),
        "dirty": (["-fn_train", str(csv), *model, "-cycles", "2", "--start-cycle", "1",
                   *common], DIRTY),
        "qc_train": (["-fn_train", str(csv), "-fn_test", str(cohort["val"]), *qc], QC_SCRIPT),
        "qc_test": (["-fn_train", str(cohort["train"]), "-fn_test", str(csv), *qc], QC_SCRIPT),
        "inference": (["-fn", str(csv), "-en", str(pre), "-pd", str(pre), "-o", "res",
                       *common], INFERENCE),
        "generator": (["--csv", str(csv), "--out", str(out), "--whole-centers", "1",
                       "--quiet"], GENERATOR),
    }
    if entry == "node":
        return _node(csv, out, capsys)
    args, script = argv[entry]
    return call_script(args, capsys, out, script_path=script)


def _written(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


def check_outcome(run: ScriptRun, case: BadCase, entry: str, finite: list[bool]) -> str:
    """Assert the case's exact outcome at this entry point; 'ok' or 'error'."""
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert all(finite), f"{entry}: a training step saw a non-finite value"
    if not case.fine:
        assert run.returncode == 2, (entry, run.stderr[-3000:])
        lines = run.error_lines()
        assert len(lines) == 1 and lines[0] == run.stderr.strip().splitlines()[-1], run.stderr
        assert re.search(case.message, lines[0]), (entry, lines[0], case.message)
        assert _written(run.out) == [], f"{entry}: wrote {_written(run.out)}"
        return "error"
    assert run.returncode == 0, (entry, run.stderr[-3000:])
    assert run.error_lines() == []
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    if case.message:
        assert any(re.search(case.message, w) for w in warnings), (entry, run.stderr)
    expected = {"standard": "tm_state_000.npz", "dirty": "dirty_state_001.npz",
                "qc_train": "qc_summary.json", "qc_test": "qc_summary.json",
                "inference": "res_predictions.csv", "generator": "train.csv"}.get(entry)
    if expected:
        assert (run.out / expected).is_file(), (entry, _written(run.out))
    if entry in ("standard", "dirty"):  # the model trained on the case is finite
        state = np.load(run.out / expected)
        assert all(np.isfinite(state[k]).all() for k in state.files
                   if np.issubdtype(state[k].dtype, np.floating))
    return "ok"


def _entries(name: str, case: BadCase) -> tuple[str, ...]:
    if not case.fine or name in TRAINED_ONE_BY_ONE:
        return ENTRY_POINTS
    return ("inference", "generator", "node")  # cheap; training ones: all fine cases at once


def test_every_case_through_every_entry_point(malformed_cases, pre, cohort, capsys, tmp_path,
                                              finite_steps):
    outcomes: dict[tuple[str, str], str] = {}
    for name, case in malformed_cases.items():
        for entry in _entries(name, case):
            out = tmp_path / name / entry
            run = run_entry(entry, case.csv, out, pre, cohort, capsys)
            outcomes[name, entry] = check_outcome(run, case, entry, finite_steps)
    refused = {n for n, c in malformed_cases.items() if not c.fine}
    assert {n for (n, _), o in outcomes.items() if o == "error"} == refused
    assert len(outcomes) >= 7 * len(refused)
    report = os.environ.get("DQC_OUTCOME_TABLE")  # where to write the case x entry table
    if report:
        Path(report).write_text("".join(f"{n} | {e} | {o}\n" for (n, e), o in outcomes.items()))


def test_all_fine_defects_at_once(malformed_cases, pre, cohort, capsys, tmp_path, finite_steps):
    """Every merely-unusual image in one CSV with every unusual CSV form (BOM, `;`, padded
    cells, 1.0/0.0 labels): each training entry point runs on it, on finite values only."""
    import pandas as pd

    from dqc.data import load_table

    fine = [n for n, c in malformed_cases.items() if c.fine and not c.table_error]
    table = load_table(malformed_cases["bom"].csv, "inference").drop(columns="Path")
    table["Path"] = [load_table(malformed_cases[n].csv, "inference").Path[2] for n in fine] + \
        list(load_table(malformed_cases["bom"].csv, "inference").Path[len(fine):])
    table["Group_bin"] = table.Group_bin.astype(float)
    csv = tmp_path / "messy.csv"
    padded = table.astype(str).map(lambda cell: f" {cell}  ")
    csv.write_text(padded.to_csv(index=False, sep=";"), encoding="utf-8-sig")
    case = BadCase(csv, r"4D image with a singleton 4th axis", False, fine=True)
    assert len(fine) == 4 and len(pd.read_csv(csv, sep=";")) == 6
    for entry in ENTRY_POINTS:
        check_outcome(run_entry(entry, csv, tmp_path / entry, pre, cohort, capsys), case, entry,
                      finite_steps)
    assert finite_steps and all(finite_steps)


def test_the_finite_guard_can_fail(finite_steps, pre):
    """The guard the corpus relies on does see a NaN batch."""
    from dqc.checkpoint import load_trainer

    trainer, _ = load_trainer(pre / "tm_encoder_000.keras", pre / "tm_classifier_000.keras")
    x = np.zeros((1, 20, 24, 20, 1), np.float32)
    x[0, 1, 1, 1, 0] = np.nan
    trainer.train_step(x, np.zeros(1, np.float32))
    assert finite_steps == [False]


@pytest.mark.parametrize("name", ["bom", "semicolons", "trailing_spaces", "float_labels"])
def test_unusual_csv_forms_read_like_the_plain_one(malformed_cases, name):
    from dqc.data import load_table

    plain = load_table(malformed_cases["wild_range"].csv, "inference")  # same rows, plain form
    odd = load_table(malformed_cases[name].csv, "inference")
    for column in ("Subject", "Study", "Group_bin", "Sex", "Age"):
        assert list(odd[column]) == list(plain[column]), column
    assert list(odd.Path)[:2] == list(plain.Path)[:2]
    assert odd.attrs["csv"] == str(malformed_cases[name].csv)
