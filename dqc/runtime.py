"""The Keras backend in the open: chosen before Keras starts, named in one line when it does.

Keras reads KERAS_BACKEND once, at its first import, so every entry point runs through
`dqc.cli.run_main`, which calls `choose_backend` before the script's `main` imports anything
that imports Keras; that reads `--backend` from the command line (a pre-parse: the scripts'
parsers run later) and fixes the choice. A run then fixes its precision and seeds with
`setup_runtime`, explicitly where it starts.
Which backend, first match wins:

1. `--backend NAME` on the command line;
2. the KERAS_BACKEND environment variable;
3. the file `keras-backend` in the Python environment (`sys.prefix`), which `make setup GPU=1`
   writes (`jax`), so every script runs on the GPU without flags;
4. tensorflow.

The start line (`backend: jax on NVIDIA H100 80GB HBM3, float32`) goes to stderr when the
backend first computes (a `Trainer` is built, or inference loads its first model): after the
inputs and model files are checked, so a refused input still gives one error line only.

A quiet start (`quiet_start`): TensorFlow's C++ start-up lines (absl's "All log messages
before absl::InitializeLog()", oneDNN's and the CPU feature guard's notes) are printed while
`import tensorflow` runs, before TF_CPP_MIN_LOG_LEVEL is honoured, so that import runs with
the process's stderr caught and only other lines passed on. `--verbose` or DQC_VERBOSE=1
keeps every line.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator, Mapping, Sequence

from dqc.errors import DQCError

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKEND = "tensorflow"
BACKEND_FILE = "keras-backend"  # in sys.prefix; written by `make setup GPU=1`
VERBOSE_ENV = "DQC_VERBOSE"     # 1: TensorFlow's start-up lines stay (as --verbose)
#: What TensorFlow's import prints through absl before logging is set up: absl's own note,
#: its `I0000 00:00:... file.cc:N]` lines, and the CPU feature guard's second line.
_START_UP_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)"
                             r"|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
                             r"|To enable the following instructions: ")
_INSTALL_HINT = {"tensorflow": "make setup", "jax": "make setup (CPU) or make setup GPU=1",
                 "torch": "pip install torch"}


def requested_backend(argv: Sequence[str], environ: Mapping[str, str], prefix: str | Path
                      ) -> tuple[str, str]:
    """(backend, where the choice came from), by the precedence of the module docstring."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--backend":
            if i + 1 >= len(argv):
                raise DQCError("--backend needs a value: " + ", ".join(BACKENDS))
            return argv[i + 1], "--backend"
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1], "--backend"
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"], "KERAS_BACKEND"
    chosen = Path(prefix) / BACKEND_FILE
    if chosen.is_file() and chosen.read_text().strip():
        return chosen.read_text().strip(), str(chosen)
    return DEFAULT_BACKEND, "default"


def choose_backend(argv: Sequence[str] | None = None) -> str:
    """Fix KERAS_BACKEND for this process and its children; refuse one that cannot start."""
    name, source = requested_backend(sys.argv[1:] if argv is None else argv, os.environ,
                                     sys.prefix)
    if name not in BACKENDS:
        raise DQCError(f"unknown Keras backend {name!r} (from {source}); choose one of "
                       + ", ".join(BACKENDS))
    if importlib.util.find_spec(name) is None:
        raise DQCError(f"Keras backend {name!r} (from {source}) is not installed; "
                       f"{_INSTALL_HINT[name]} installs it")
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise DQCError(f"Keras already started with {keras.backend.backend()}; {name} (from "
                       f"{source}) must be chosen before Keras is first imported")
    os.environ["KERAS_BACKEND"] = name
    return name


def wants_verbose(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """`--verbose` on the command line (before any `--`) or DQC_VERBOSE set and not 0."""
    args = list(argv)
    args = args[:args.index("--")] if "--" in args else args
    return "--verbose" in args or environ.get(VERBOSE_ENV, "0").strip() not in ("", "0")


def quiet_start(verbose: bool) -> None:
    """Unless `verbose`: TensorFlow's C++ logging at warnings and above only
    (TF_CPP_MIN_LOG_LEVEL 2, unless set), and its first import with its start-up lines left
    out (module docstring). Nothing is imported here: a run that never needs TensorFlow
    (`--help`, the cohort) pays nothing."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_tensorflow_import()


def quiet_tensorflow_import() -> None:
    """TensorFlow's first import in this process with its start-up lines left out (and
    nothing else changed: its later C++ logging, and child processes, keep their level)."""
    if "tensorflow" not in sys.modules and not any(
            isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the other finders and runs its import with stderr caught;
    leaves `sys.meta_path` when that import runs (a mere `find_spec` keeps it there)."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib API
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CaughtLoader(spec.loader, self)
                return spec
        return None


class _CaughtLoader(importlib.abc.Loader):
    """The real loader, whose `exec_module` runs inside `_start_up_lines_dropped`; the
    module keeps the real loader afterwards."""

    def __init__(self, loader: importlib.abc.Loader, finder: _QuietTensorFlowImport):
        self.loader = loader
        self.finder = finder

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):  # noqa: D102 - importlib API
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:  # noqa: D102 - importlib API
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        module.__loader__ = module.__spec__.loader = self.loader
        with _start_up_lines_dropped():
            self.loader.exec_module(module)


@contextmanager
def _start_up_lines_dropped() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file meanwhile (C++ writes there, not to
    `sys.stderr`); afterwards every caught line but TensorFlow's start-up lines is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _START_UP_NOISE.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def setup_runtime(seed: int, mixed_precision: bool = False) -> None:
    """Seed Keras/numpy/python and pick the compute precision (float32 unless asked): global
    Keras state, set by whoever starts a run (`dqc.runs.train_cycles`,
    `dqc.runs.run_quality_control`, a federated node, the detectability instrument)."""
    import keras

    # bfloat16 needs no loss scaling, so the optimizer state has the same variables in both
    # precisions and a float32 checkpoint continues under mixed precision and back.
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if mixed_precision else "float32")
    keras.utils.set_random_seed(seed)


def device_name(backend: str) -> str:
    """What the backend computes on: `CPU`, or the accelerator's name (`2 x` when several)."""
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform != "cpu"]
        name = gpus[0].device_kind if gpus else "CPU"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        name = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                if gpus else "CPU")
    else:
        import torch

        gpus = list(range(torch.cuda.device_count()))
        name = torch.cuda.get_device_name(0) if gpus else "CPU"
    return f"{len(gpus)} x {name}" if len(gpus) > 1 else name


def start_line() -> str:
    """`backend: BACKEND on DEVICE, PRECISION` for the running Keras and its dtype policy."""
    import keras

    backend = keras.backend.backend()
    return (f"backend: {backend} on {device_name(backend)}, "
            f"{keras.mixed_precision.dtype_policy().name}")


def announce() -> None:
    """Print the start line on stderr, once per process and setting (the demo starts many
    runs in one process; a change of precision gets its own line)."""
    _print_once(start_line())


@functools.lru_cache(maxsize=None)
def _print_once(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
