"""A reduced demo end to end: every stage runs, the report has its files and table, and a
second run reuses every stage."""

import json
from pathlib import Path

import pandas as pd
import pytest

from dqc.browser import find_browser
from dqc.demo import DemoConfig, Stages

TINY = dict(centers=5, n_train=30, n_val=16, n_test=12, downsample=8, effect=0.6, pretrain=2,
            cycles=4, error=0.2, whole_centers=1, single_images=2, width=0.25,
            criteria=("rates", "combined"),
            instrument_n=2, verbose=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    Stages(DemoConfig(out=out, **TINY)).run()
    return out


def test_report_files_and_table(demo: Path):
    report = demo / "report"
    for name in ("README.md", "results.csv", "detection.csv", "summary.json",
                 "test_metrics_A.png", "test_metrics_B.png", "qc_log_A_rates.png",
                 "qc_log_B_combined.png", "harmful_types.png", "detectability.png"):
        assert (report / name).is_file(), name
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = pd.read_csv(report / "results.csv")
    # scenario A is whole inverted centers: it stands for the inverted type's own run
    assert list(results.run) == ["clean", "dirty_noise", "dirty_A",
                                 "qc_A_rates", "qc_A_combined", "dirty_B", "qc_B_rates",
                                 "qc_B_combined"]
    assert set(results.cycle) == {TINY["cycles"] - 1}
    assert results[["accuracy", "auroc"]].apply(lambda c: c.between(0, 1)).all().all()
    detection = pd.read_csv(report / "detection.csv")
    assert list(detection.scenario) == ["whole harmful centers"] * 2 + ["single harmful images"] * 2
    assert list(detection.criterion) == ["rates", "combined"] * 2
    # scenario A: one whole center of the 30 training images; B: two added images
    assert detection["harmful eliminated"].str.split("/").str[1].astype(int).tolist()[2] == 2
    text = (report / "README.md").read_text()
    assert "| clean | 3 |" in text and "![QC log, scenario A, rates](qc_log_A_rates.png)" in text
    assert text.count("**shown**") + text.count("**not shown**") == 3  # the three findings
    for scenario in "AB":  # each QC run's own page, linked; scenario A's pages pictured
        for k in TINY["criteria"]:
            assert f"[scenario {scenario}, {k}](../qc_{scenario}_{k}/qc_report.html)" in text
            assert (demo / f"qc_{scenario}_{k}" / "qc_report.html").is_file()
            assert (report / f"qc_page_{scenario}_{k}.png").is_file() == \
                (scenario == "A" and find_browser() is not None)
    summary = json.loads((report / "summary.json").read_text())
    clean = results.set_index("run").auroc
    assert summary["clean_auroc"] == pytest.approx(clean["clean"], abs=5e-4)
    whole = summary["scenarios"]["whole_centers"]
    assert whole["dirty_auroc"] == pytest.approx(clean["dirty_A"], abs=5e-4)
    assert [r["criterion"] for r in whole["qc"]] == ["rates", "combined"]
    a_rates = pd.read_csv(demo / "qc_A_rates" / "qc_images.csv")
    harmful = a_rates[a_rates.Harmful == 1]
    assert whole["qc"][0]["harmful_eliminated"] == pytest.approx(harmful.eliminated.mean())
    assert set(summary["scenarios"]) == {"whole_centers", "single_images"}
    assert summary["per_type"]["inverted"]["dirty_auroc"] == whole["dirty_auroc"]
    assert not (demo / "dirty_inverted").exists()


def test_rerun_reuses_every_stage(demo: Path, capsys):
    Stages(DemoConfig(out=demo, **TINY)).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    stages = [line for line in lines if "report" not in line]
    assert stages and all(line.endswith("reused") for line in stages)
