"""A QC run killed mid-cycle and resumed ends exactly like an uninterrupted run."""

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers import QC_SCRIPT

CYCLES = 3  # QC cycles START..START+2: killed in START+1, resumed there


def qc_command(cohort: dict, out, *extra: str) -> list[str]:
    start = cohort["start"]
    return [sys.executable, str(QC_SCRIPT), "-fn_train", str(cohort["train"]),
            "-fn_test", str(cohort["val"]), "-cycles", str(start + CYCLES),
            "-en", str(cohort["encoder"]), "-pd", str(cohort["classifier"]),
            "-revisit", "1", "-error", "0.2", "-fn_save", "run", "--out", str(out),
            "--start-cycle", str(start), "--quiet", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained_one):
    root = tmp_path_factory.mktemp("resume")
    cohort = pretrained_one
    start = cohort["start"]
    whole = subprocess.Popen(qc_command(cohort, root / "whole"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(qc_command(cohort, root / "killed"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first_state = root / "killed" / f"run_state_{start:03d}.npz"
    deadline = time.time() + 240
    while not first_state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # now inside cycle start+1
    killed_code = killed.wait()
    log_at_kill = (root / "killed" / "run.csv").read_text()
    resumed = subprocess.run(qc_command(cohort, root / "killed", "--resume"),
                             capture_output=True, text=True, timeout=300)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    return dict(root=root, killed_code=killed_code, resumed=resumed, start=start,
                log_at_kill=log_at_kill)


def read(path):
    return pd.read_csv(path, keep_default_na=False)


def test_kill_left_complete_files_only(runs):
    assert runs["killed_code"] == -signal.SIGKILL
    log = pd.read_csv(pd.io.common.StringIO(runs["log_at_kill"]), keep_default_na=False)
    assert set(log.Cycle) <= {0, runs["start"]}  # the log holds whole cycles only
    leftovers = [p.name for p in (runs["root"] / "killed").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(".tmp" in n or n.startswith(".run_") for n in leftovers)


def test_resumed_run_matches_uninterrupted_run(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr
    assert "resuming after cycle" in runs["resumed"].stdout
    whole, killed = runs["root"] / "whole", runs["root"] / "killed"
    pd.testing.assert_frame_equal(read(whole / "run.csv"), read(killed / "run.csv"))
    pd.testing.assert_frame_equal(read(whole / "run_images.csv"), read(killed / "run_images.csv"))
    assert (whole / "run_summary.json").read_text() == (killed / "run_summary.json").read_text()
    assert len(read(whole / "run.csv").query("Cycle > 0").Cycle.unique()) == CYCLES
