"""The package as a user installs it: pyproject.toml's declared dependencies in step with the
pinned requirements*.txt, and `pip install .` into an empty venv giving working commands.

How the two are kept in step: pyproject.toml declares compatible ranges (the pinned version
up to the next release that may break), requirements.txt and requirements-gpu.txt pin the set
`make setup` installs and the tests run on; a pin is raised within its range, or the range
moves with it. `test_requirements_are_in_step` fails when they drift.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import ROOT, TINY

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Every installed command, and the module or script whose flags it has.
COMMANDS = ("dqc-train", "dqc-dirty", "dqc-qc", "dqc-infer", "dqc-harmful", "dqc-cohort",
            "dqc-demo", "dqc-detectability", "dqc-bench", "dqc-export", "dqc-federated",
            "dqc-readme")


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#", 1)[0].strip()) for line in lines
            if line.split("#", 1)[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def _pinned_file(name: str) -> dict[str, Requirement]:
    return _requirements((ROOT / name).read_text().splitlines())


def out_of_step(declared: dict[str, Requirement], pinned: dict[str, Requirement],
                build: dict[str, Requirement]) -> list[str]:
    """What keeps `pinned` (a requirements file) from being an install of `declared`: a pin
    outside its declared range or with other extras, a declared dependency not pinned, a
    pinned package not declared. An unpinned line must be a build requirement, as declared."""
    problems = []
    for name, pin in pinned.items():
        exact = [s.version for s in pin.specifier if s.operator == "=="]
        if not exact:
            if name not in build or build[name].specifier != pin.specifier:
                problems.append(f"{pin} is neither pinned nor a build requirement")
        elif name not in declared:
            problems.append(f"{pin} is pinned but not declared")
        elif not declared[name].specifier.contains(exact[0], prereleases=True):
            problems.append(f"{pin} is outside the declared {declared[name]}")
        elif declared[name].extras != pin.extras:
            problems.append(f"{pin} has other extras than the declared {declared[name]}")
    problems += [f"{req} is declared but not pinned" for name, req in declared.items()
                 if name not in pinned]
    return problems


def _declared(*extras: str, base: bool = True) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"]) if base else []
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return _requirements(lines)


BUILD = _requirements(PYPROJECT["build-system"]["requires"])


def test_requirements_are_in_step() -> None:
    assert out_of_step(_declared("federated", "test"), _pinned_file("requirements.txt"),
                       BUILD) == []
    assert out_of_step(_declared("gpu", base=False), _pinned_file("requirements-gpu.txt"),
                       BUILD) == []


def test_the_step_check_finds_drift() -> None:
    declared = _requirements(["numpy>=2.4,<3", "flwr[simulation]>=1.42,<1.43", "tqdm>=4"])
    pinned = _requirements(["numpy==3.0.0", "flwr==1.42.0", "pandas==3.1.1", "pip>=20"])
    assert out_of_step(declared, pinned, BUILD) == [
        "numpy==3.0.0 is outside the declared numpy<3,>=2.4",
        "flwr==1.42.0 has other extras than the declared flwr[simulation]<1.43,>=1.42",
        "pandas==3.1.1 is pinned but not declared",
        "pip>=20 is neither pinned nor a build requirement",
        "tqdm>=4 is declared but not pinned"]


@pytest.mark.parametrize("machine, wanted", [("x86_64", "tensorflow-cpu"),
                                              ("AMD64", "tensorflow-cpu"),
                                              ("aarch64", "tensorflow"), ("arm64", "tensorflow")])
def test_exactly_one_tensorflow_installs_on_each_machine(machine: str, wanted: str) -> None:
    """tensorflow-cpu has x86-64 wheels only: elsewhere the tensorflow wheel, in both files."""
    for found in (_declared(), _pinned_file("requirements.txt")):
        chosen = [name for name, req in found.items() if name.startswith("tensorflow")
                  and (req.marker is None or req.marker.evaluate({"platform_machine": machine}))]
        assert chosen == [wanted]


def test_every_command_is_declared() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert tuple(scripts) == COMMANDS
    readme = (ROOT / "README.md").read_text()
    assert [c for c in COMMANDS if f"`{c}`" not in readme] == []


# --- pip install . into an empty venv ----------------------------------------------------------

def _user_env() -> dict[str, str]:
    """This process's environment as a user's shell has it: without PYTHONPATH, which Flower's
    Ray backend sets in its driver process (a simulation test before this one), so that the
    venv would see this checkout's packages and pip would install none of the dependencies."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv with `pip install .` of this checkout: the package built from its
    pyproject.toml, README.md and dqc/ only, its dependencies resolved by pip from the
    declared ranges (through pip's cache and configured index, as a user's install). Once per
    session: it takes minutes (2.2 GB of wheels to unpack)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dqc", source / "dqc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_user_env())
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           str(source)], capture_output=True, text=True, timeout=1500,
                          env=_user_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def _command(bin_dir: Path, name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=_user_env())


@pytest.mark.install
def test_installed_commands_show_their_flags(installed: Path, tmp_path: Path) -> None:
    for name in COMMANDS:
        done = _command(installed, name, "--help", cwd=tmp_path)
        if name == "dqc-federated":  # Flower is the federated extra, not installed here
            assert (done.returncode, done.stderr.splitlines()) == (2, [
                "error: dqc-federated needs Flower: pip install 'dqc[federated]' (or make "
                "setup, which installs requirements.txt)"])
            continue
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert done.stdout.startswith("usage: ") and "--backend" in done.stdout, name
    # the package ran from the venv, not from this checkout
    where = subprocess.run([str(installed / "python"), "-c", "import dqc; print(dqc.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True,
                           env=_user_env()).stdout
    assert Path(where.strip()).is_relative_to(installed.parent)


@pytest.mark.install
def test_installed_commands_run_standard_qc_inference(installed: Path, tmp_path: Path) -> None:
    """The tiny cohort, one pre-training cycle, one QC cycle, inference, by the commands."""
    steps = [
        ["dqc-cohort", "--out", "cohort", "--centers", str(TINY["centers"]),
         "--train", str(TINY["n_train"]), "--val", str(TINY["n_val"]),
         "--test", str(TINY["n_test"]), "--downsample", str(TINY["downsample"])],
        ["dqc-train", "-fn_train", "cohort/train.csv", "-cycles", "1", "--out", "pre",
         "--quiet"],
        ["dqc-qc", "-fn_train", "cohort/train.csv", "-fn_test", "cohort/val.csv",
         "-cycles", "2", "--start-cycle", "1", "-en", "pre/tm_encoder_000.keras",
         "-pd", "pre/tm_classifier_000.keras", "--out", "qc", "--quiet"],
        ["dqc-infer", "-fn", "cohort/test.csv", "-en", "qc", "-pd", "qc", "-o", "test",
         "--out", "inference", "--quiet"],
    ]
    for name, *args in steps:
        done = _command(installed, name, *args, cwd=tmp_path)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert "oneDNN" not in done.stderr and "absl" not in done.stderr, done.stderr
    images = pd.read_csv(tmp_path / "qc" / "qc_images.csv")
    train = pd.read_csv(tmp_path / "cohort" / "train.csv")
    assert sorted(images.Subject) == sorted(train.Subject)
    log = pd.read_csv(tmp_path / "qc" / "qc.csv")
    assert set(log.Cycle) >= {1}
    metrics = pd.read_csv(tmp_path / "inference" / "test_metrics.csv")
    predictions = pd.read_csv(tmp_path / "inference" / "test_predictions.csv")
    assert metrics.cycle.tolist() == [1]
    assert len(predictions) == TINY["n_test"]
