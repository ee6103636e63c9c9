"""standard_travelling_model/enc_PD_train_distributed.py as a user runs it."""

from __future__ import annotations

import re

import pytest

from helpers import call_script
from dqc import checkpoint
from dqc.trainer import learning_rate

LINE = re.compile(r"^cycle +(\d+)  loss \d+\.\d{4}  train acc [01]\.\d{3}  24 images in 5 "
                  r"batches  lr (\S+)  \d+\.\d s$")
FLAGS = ["-fn_train", "-cycles", "-epochs", "-batch_size", "--image-shape", "--out", "--seed",
         "--prefix", "--resume", "--no-cache", "--cache-mb", "--eval-batch-size",
         "--mixed-precision", "--quiet"]


def _files(cycles: int) -> list[str]:
    return sorted(f"tm_{part}_{c:03d}.{ext}" for c in range(cycles)
                  for part, ext in (("encoder", "keras"), ("classifier", "keras"),
                                    ("state", "npz")))


def _check_success(run, cycles: int) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not run.error_lines()
    assert "reading training images" not in run.stderr  # --quiet: no progress bars
    assert sorted(p.name for p in run.out.iterdir()) == _files(cycles)
    lines = [line for line in run.stdout.splitlines() if line.startswith("cycle")]
    assert len(lines) == cycles, run.stdout
    for c, line in enumerate(lines):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == c
        assert float(match[2]) == pytest.approx(learning_rate(c), rel=0.01)
    assert lines[0].startswith("cycle   0  loss ")
    meta, _ = checkpoint.read_state(run.out / f"tm_state_{cycles - 1:03d}.npz")
    assert meta["cycle"] == cycles - 1 and meta["seed"] == 40  # the script's default seed


def test_runs_from_the_repository_root(script_runs):
    _check_success(script_runs.get("from_root"), cycles=2)


def test_start_line_names_backend_device_and_precision(script_runs):
    import keras

    from dqc.runtime import device_name

    run = script_runs.get("from_root")
    lines = [line for line in run.stderr.splitlines() if line.startswith("backend: ")]
    backend = keras.backend.backend()  # the script ran with this process's environment
    assert lines == [f"backend: {backend} on {device_name(backend)}, float32"], run.stderr


def test_runs_from_inside_its_folder_with_a_relative_csv(script_runs):
    # the CSV path is relative to the script's folder, the image Paths relative to the CSV's
    _check_success(script_runs.get("from_script_dir"), cycles=1)


def test_help_exits_0_and_mentions_every_flag(capsys, tmp_path):
    run = call_script(["--help"], capsys, tmp_path)
    assert run.returncode == 0
    assert run.stdout.startswith("usage:")
    for flag in FLAGS:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", run.stdout), flag
    assert not tmp_path.joinpath("tm_encoder_000.keras").exists()


@pytest.mark.parametrize("argv, message", [
    (["-cycles", "1"], r"the following arguments are required: -fn_train"),
    (["-fn_train", "x.csv", "-cycles", "two"], r"argument -cycles: invalid int value: 'two'"),
    (["-fn_train", "TRAIN", "-cycles", "0"], r"-cycles 0 leaves nothing to train"),
    (["-fn_train", "TRAIN", "-cycles", "1", "-batch_size", "0"],
     r"-batch_size and -epochs must be at least 1"),
    (["-fn_train", "TRAIN", "-cycles", "1", "--image-shape", "20x24"],
     r"--image-shape: expected three positive integers"),
])
def test_bad_flags_give_one_error_line_and_exit_2(argv, message, cohort, capsys, tmp_path):
    out = tmp_path / "out"
    argv = [str(cohort["train"]) if a == "TRAIN" else a for a in argv]
    run = call_script([*argv, "--out", str(out), "--quiet"], capsys, out)
    assert run.returncode == 2
    lines = run.error_lines()
    assert len(lines) == 1 and re.search(message, lines[0]), run.stderr
    assert "Traceback" not in run.stderr
    assert run.model_files() == []
