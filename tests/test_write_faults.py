"""Faults while writing: a full disk during a checkpoint, a checkpoint corrupted afterwards."""

from __future__ import annotations

import errno

import numpy as np

from helpers import call_script
from dqc.checkpoint import last_complete_cycle, read_state


def _run(cohort, out, capsys, *extra: str):
    return call_script(["-fn_train", str(cohort["train"]), "-cycles", "3", "--out", str(out),
                        "--quiet", *extra], capsys, out)


def test_full_disk_keeps_previous_cycle_and_resume_continues(cohort, tmp_path, capsys,
                                                             monkeypatch):
    out = tmp_path / "out"
    savez, calls = np.savez, []

    def filling(file, *args, **kwargs):  # cycle 1's state: some bytes, then the disk is full
        calls.append(1)
        if len(calls) == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(file, *args, **kwargs)
    monkeypatch.setattr(np, "savez", filling)
    run = _run(cohort, out, capsys)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.error_lines() == [f"error: {out / 'tm_state_001.npz'}: cannot write (No space "
                                 "left on device); the previous version, if any, is kept"]
    assert last_complete_cycle(out, "tm") == 0
    assert read_state(out / "tm_state_000.npz")[0]["cycle"] == 0  # intact
    assert not (out / "tm_state_001.npz").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files

    monkeypatch.setattr(np, "savez", savez)  # space is back
    resumed = _run(cohort, out, capsys, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after cycle 0" in resumed.stdout
    assert last_complete_cycle(out, "tm") == 2

    # a checkpoint corrupted after the fact: one line naming it on --resume
    state = out / "tm_state_002.npz"
    state.write_bytes(state.read_bytes()[:200])
    broken = _run(cohort, out, capsys, "--resume", "-cycles", "4")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.error_lines() == [f"error: {state}: cannot read training state (BadZipFile)"]
    encoder = out / "tm_encoder_002.keras"
    encoder.write_bytes(b"\0" * 100)
    broken = _run(cohort, out, capsys, "--resume", "-cycles", "4")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert len(broken.error_lines()) == 1
    assert broken.error_lines()[0].startswith(f"error: {encoder}: cannot load encoder model")
