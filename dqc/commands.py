"""The installed commands (`[project.scripts]` in pyproject.toml): each runs one entry point's
`main` through `dqc.cli.run_main`, as its folder script or `python -m` does.

The module is imported only once `run_main` has set up the process (quiet start, Keras
backend), so nothing that imports Keras runs before the backend is chosen.
"""

from __future__ import annotations

import importlib
import importlib.util

from dqc.cli import run_main
from dqc.errors import DQCError


def _run(module: str) -> None:
    run_main(lambda: importlib.import_module(module).main())


def train() -> None:
    """`dqc-train`: standard_travelling_model/enc_PD_train_distributed.py."""
    _run("dqc.scripts.train")


def dirty() -> None:
    """`dqc-dirty`: dirty_baselines/enc_PD_train_dirt_baseline.py."""
    _run("dqc.scripts.dirty")


def quality_control() -> None:
    """`dqc-qc`: travelling_quality_control/enc_PD_quality_control.py."""
    _run("dqc.scripts.qc")


def infer() -> None:
    """`dqc-infer`: inference/inference_pd_distributed.py."""
    _run("dqc.scripts.infer")


def harmful() -> None:
    """`dqc-harmful`: generate_harmful_samples/generate_data.py."""
    _run("dqc.scripts.harmful")


def cohort() -> None:
    """`dqc-cohort`: python -m dqc.cohort."""
    _run("dqc.cohort")


def demo() -> None:
    """`dqc-demo`: python -m dqc.demo."""
    _run("dqc.demo")


def detectability() -> None:
    """`dqc-detectability`: python -m dqc.detectability."""
    _run("dqc.detectability")


def bench() -> None:
    """`dqc-bench`: python -m dqc.bench."""
    _run("dqc.bench")


def export() -> None:
    """`dqc-export`: python -m dqc.export."""
    _run("dqc.export")


def readme() -> None:
    """`dqc-readme`: python -m dqc.readme."""
    _run("dqc.readme")


def federated() -> None:
    """`dqc-federated`: python -m dqc.federated; Flower is an extra (`pip install
    'dqc[federated]'`), so without it one `error:` line says so."""
    def main() -> object:
        if importlib.util.find_spec("flwr") is None:
            raise DQCError("dqc-federated needs Flower: pip install 'dqc[federated]' "
                           "(or make setup, which installs requirements.txt)")
        return importlib.import_module("dqc.federated.__main__").main()
    run_main(main)
