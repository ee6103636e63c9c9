"""A normal run's stderr holds no TensorFlow/absl/oneDNN start-up line; --verbose or
DQC_VERBOSE=1 brings them back (dqc.runtime.quiet_start)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT, SCRIPT

#: What TensorFlow prints at its import when nobody stops it (absl's note, its log lines).
NOISE = re.compile(r"absl::InitializeLog|oneDNN|cpu_feature_guard|^[IWEF]\d{4} ")


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line)]


def test_a_training_run_prints_no_start_up_line(script_runs) -> None:
    run = script_runs.get("from_root")  # the standard script, 2 cycles, as a subprocess
    assert run.returncode == 0, run.stderr
    assert any(line.startswith("backend: ") for line in run.stderr.splitlines())  # Keras ran
    assert _noise(run.stderr) == []


def test_verbose_brings_the_start_up_lines_back(cohort: dict, tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("DQC_VERBOSE", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "-fn_train", str(cohort["train"]),
                           "-cycles", "1", "--out", str(tmp_path), "--quiet", "--verbose"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _noise(done.stderr), done.stderr


def _fake_tensorflow(folder: Path) -> None:
    """A `tensorflow` package whose import writes to file descriptor 2 as TensorFlow's does
    (absl's note and an I-line), plus a line of its own that is not start-up noise."""
    package = folder / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\\n")
        os.write(2, b"I0000 00:00:1796189697.405621   16102 port.cc:153] oneDNN custom "
                    b"operations are on.\\n")
        os.write(2, b"a real problem the user must see\\n")
        LOADED = True
    """))


def _import_fake(folder: Path, argv: list[str], verbose_env: str | None = None
                 ) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(folder)!r})
        from dqc.runtime import quiet_start, wants_verbose
        quiet_start(wants_verbose({argv!r}, os.environ))
        import tensorflow
        print("imported", tensorflow.LOADED, type(tensorflow.__loader__).__name__,
              file=sys.stderr)
    """)
    env = {k: v for k, v in os.environ.items() if k != "DQC_VERBOSE"}
    env.update({} if verbose_env is None else {"DQC_VERBOSE": verbose_env})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_only_the_start_up_lines_are_dropped(tmp_path: Path) -> None:
    _fake_tensorflow(tmp_path)
    quiet = _import_fake(tmp_path, [])
    assert quiet.returncode == 0, quiet.stderr
    # the module's own line is passed on, in order; the module keeps its real loader
    assert quiet.stderr.splitlines() == ["a real problem the user must see",
                                         "imported True SourceFileLoader"]
    for loud in (_import_fake(tmp_path, ["--verbose"]), _import_fake(tmp_path, [], "1")):
        assert len(_noise(loud.stderr)) == 2 and "a real problem" in loud.stderr
    assert _noise(_import_fake(tmp_path, [], "0").stderr) == []
