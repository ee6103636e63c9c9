"""A reduced demo end to end: every stage runs, the report has its files and table, and a
second run reuses every stage."""

from pathlib import Path

import pandas as pd
import pytest

from dqc.demo import DemoConfig, Stages

TINY = dict(centers=5, n_train=30, n_val=16, n_test=12, downsample=8, effect=0.6, pretrain=2,
            cycles=4, error=0.2, whole_centers=1, single_images=2, verbose=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    Stages(DemoConfig(out=out, **TINY)).run()
    return out


def test_report_files_and_table(demo: Path):
    report = demo / "report"
    for name in ("README.md", "results.csv", "detection.csv", "test_metrics_A.png",
                 "test_metrics_B.png", "qc_log_A.png", "qc_log_B.png", "harmful_types.png"):
        assert (report / name).is_file(), name
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = pd.read_csv(report / "results.csv")
    assert list(results.run) == ["clean", "dirty", "qc", "dirty", "qc"]
    assert set(results.cycle) == {TINY["cycles"] - 1}
    assert results[["accuracy", "auroc"]].apply(lambda c: c.between(0, 1)).all().all()
    detection = pd.read_csv(report / "detection.csv")
    assert list(detection.scenario) == ["whole harmful centers", "single harmful images"]
    # scenario A: one whole center of the 30 training images; B: two added images
    assert detection["harmful eliminated"].str.split("/").str[1].astype(int).tolist()[1] == 2
    text = (report / "README.md").read_text()
    assert "| - | clean | 3 |" in text and "![QC log, scenario A](qc_log_A.png)" in text


def test_rerun_reuses_every_stage(demo: Path, capsys):
    Stages(DemoConfig(out=demo, **TINY)).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    stages = [line for line in lines if "report" not in line]
    assert stages and all(line.endswith("reused") for line in stages)
