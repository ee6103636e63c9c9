"""The demo: a reduced run end to end (every stage runs, the report has its files and
tables, a second run reuses every stage), and the report's figures and findings on crafted
run folders (the mean over the last cycles, pending images counted, each criterion on its
own: no best-of)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from dqc.browser import find_browser
from dqc.demo import RULES, SCENARIOS, DemoConfig, Stages, record_cycle_seconds
from dqc.report import detection_table, findings, summary

TINY = dict(centers=5, n_train=30, n_val=16, n_test=12, downsample=8, effect=0.6, pretrain=2,
            cycles=4, finding_cycles=2, whole_centers=1, single_images=2, width=0.25,
            instrument_n=2, verbose=False)
PAPER, RECOMMENDED = RULES


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    Stages(DemoConfig(out=out, **TINY)).run()
    return out


def test_report_files_and_table(demo: Path):
    report = demo / "report"
    for name in ("README.md", "results.csv", "detection.csv", "summary.json",
                 "test_metrics_A.png", "test_metrics_B.png", "test_metrics_C.png",
                 f"qc_log_A_{PAPER}.png", f"qc_log_B_{RECOMMENDED}.png",
                 f"qc_log_C_{RECOMMENDED}.png", "harmful_types.png", "detectability.png"):
        assert (report / name).is_file(), name
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = pd.read_csv(report / "results.csv")
    # scenario A is whole inverted centers: it stands for the inverted type's own run
    # scenario C has no dirty run: its no-QC run is the clean run
    assert list(results.run) == ["clean", "dirty_noise", "dirty_A",
                                 f"qc_A_{PAPER}", f"qc_A_{RECOMMENDED}", "dirty_B",
                                 f"qc_B_{PAPER}", f"qc_B_{RECOMMENDED}",
                                 f"qc_C_{PAPER}", f"qc_C_{RECOMMENDED}"]
    assert set(results.cycle) == {TINY["cycles"] - 1}
    assert results[["accuracy", "auroc"]].apply(lambda c: c.between(0, 1)).all().all()
    detection = pd.read_csv(report / "detection.csv")
    assert list(detection.scenario) == [s.title for s in SCENARIOS.values() for _ in RULES]
    assert list(detection.criterion) == list(RULES) * 3
    # B: two added images among 32; C: no harmful image, all 30 good
    totals = detection["harmful eliminated"].str.split("/").str[1].astype(int).tolist()
    assert totals[2:] == [2, 2, 0, 0]
    assert detection["good eliminated"].str.split("/").str[1].astype(int).tolist()[4:] == [30, 30]
    text = (report / "README.md").read_text()
    assert "| clean | 3 |" in text
    assert f"![QC log, scenario C, {PAPER}](qc_log_C_{PAPER}.png)" in text
    # finding 1, then findings 2, 3 and 4 once for each criterion
    assert text.count("**shown**") + text.count("**not shown**") == 1 + 3 * len(RULES)
    for scenario in SCENARIOS:  # each QC run's own page, linked; scenario A's pages pictured
        for k in RULES:
            assert f"[scenario {scenario}, {k}](../qc_{scenario}_{k}/qc_report.html)" in text
            assert (demo / f"qc_{scenario}_{k}" / "qc_report.html").is_file()
            assert (report / f"qc_page_{scenario}_{k}.png").is_file() == \
                (scenario == "A" and find_browser() is not None)
    result = json.loads((report / "summary.json").read_text())
    mean = results.set_index("run")["mean auroc 2..3"]
    assert result["clean_auroc"] == pytest.approx(mean["clean"], abs=5e-4)
    whole = result["scenarios"]["whole_centers"]
    assert whole["no_qc_auroc"] == pytest.approx(mean["dirty_A"], abs=5e-4)
    assert [r["criterion"] for r in whole["qc"]] == list(RULES)
    a_rates = pd.read_csv(demo / f"qc_A_{PAPER}" / "qc_images.csv")
    harmful = a_rates[a_rates.Harmful == 1]
    assert whole["qc"][0]["harmful_eliminated"] == pytest.approx(harmful.eliminated.mean())
    assert set(result["scenarios"]) == {"whole_centers", "single_images", "clean"}
    assert result["scenarios"]["clean"]["no_qc_auroc"] == result["clean_auroc"]
    assert result["per_type"]["inverted"]["dirty_auroc"] == whole["no_qc_auroc"]
    assert not (demo / "dirty_inverted").exists() and not (demo / "dirty_C").exists()
    # every continued run timed per cycle; QC's cost set against its no-QC run's cycle
    for folder in ("clean", "dirty_A", f"qc_C_{RECOMMENDED}"):
        seconds = json.loads((demo / folder / "cycle_seconds.json").read_text())
        assert set(seconds) >= {"2", "3"} and all(v > 0 for v in seconds.values())
    assert all(r["qc_to_training"] > 0 for s in result["scenarios"].values() for r in s["qc"])
    # where the demo's time went: every stage's seconds, kept across runs
    assert {"cohort", "clean travelling model", "detectability of single updates",
            f"quality control C ({RECOMMENDED})", f"inference qc_C_{PAPER}"} <= \
        set(result["stage_seconds"])


def test_rerun_reuses_every_stage(demo: Path, capsys):
    Stages(DemoConfig(out=demo, **TINY)).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    stages = [line for line in lines if "report" not in line]
    assert stages and all(line.endswith("reused") for line in stages)


# --- the report on crafted run folders: no training ----------------------------------------

CRAFTED = dict(pretrain=2, cycles=6, finding_cycles=3, types=("inverted", "noise"))
#: Test AUROC per cycle. Clean: mean over cycles 3..5 0.80, last cycle 0.70; dirty A: mean
#: 0.74 (a drop of 0.06, finding 1 shown), last 0.80 (no drop at the last cycle alone).
AUROCS = {"clean": [0.5, 0.6, 0.7, 0.80, 0.90, 0.70], "dirty_A": [0.9, 0.70, 0.72, 0.80],
          "dirty_noise": [0.8] * 4, "dirty_B": [0.8] * 4,
          f"qc_A_{PAPER}": [0.74] * 4, f"qc_A_{RECOMMENDED}": [0.5, 0.79, 0.78, 0.80],
          f"qc_B_{PAPER}": [0.8] * 4, f"qc_B_{RECOMMENDED}": [0.8] * 4,
          f"qc_C_{PAPER}": [0.8] * 4, f"qc_C_{RECOMMENDED}": [0.8] * 4}
#: Per scenario (harmful images, good images); per QC run (harmful eliminated, harmful
#: pending, good eliminated, good pending, seconds per cycle).
IMAGES = {"A": (10, 40), "B": (2, 40), "C": (0, 42)}
QC = {("A", PAPER): (0, 0, 0, 0, 3.0), ("A", RECOMMENDED): (9, 1, 1, 0, 7.0),
      ("B", PAPER): (0, 0, 0, 0, 3.0), ("B", RECOMMENDED): (1, 1, 0, 2, 7.0),
      ("C", PAPER): (0, 0, 0, 0, 3.0), ("C", RECOMMENDED): (0, 0, 2, 1, 5.0)}
TRAINING_SECONDS = 2.0


def _craft(stages: Stages) -> None:
    """The files the report reads, as a finished demo leaves them."""
    out = stages.out
    (out / "inference").mkdir(parents=True)
    for name, values in AUROCS.items():
        cycles = range(6 - len(values), 6)
        pd.DataFrame({"cycle": cycles, "auroc": values, "accuracy": 0.5, "sensitivity": 0.5,
                      "specificity": 0.5, "f1": 0.5}).to_csv(
            out / "inference" / f"{name}_metrics.csv", index=False)
    for folder, _ in stages.runs().values():
        record_cycle_seconds(folder, [TRAINING_SECONDS] * 4, 6)
    for s, (n_harmful, n_good) in IMAGES.items():
        csv = stages.scenario_csv(s)
        csv.parent.mkdir(parents=True)
        subjects = [f"h{i}" for i in range(n_harmful)] + [f"g{i}" for i in range(n_good)]
        pd.DataFrame({"Subject": subjects,
                      "HarmfulType": ["inverted"] * n_harmful + [""] * n_good}).to_csv(csv)
        for k in RULES:
            h_elim, h_pend, g_elim, g_pend, seconds = QC[s, k]
            folder = stages.qc_dir(s, k)
            record_cycle_seconds(folder, [seconds] * 4, 6)
            eliminated = [int(i < h_elim) for i in range(n_harmful)] + \
                [int(i < g_elim) for i in range(n_good)]
            pd.DataFrame({"Subject": subjects, "eliminated": eliminated}).to_csv(
                folder / "qc_images.csv", index=False)
            detection = {"harmful": n_harmful, "good": n_good,
                         "harmful_eliminated": h_elim, "harmful_pending": h_pend,
                         "good_eliminated": g_elim, "good_pending": g_pend,
                         "flagged_tpr": (h_elim + h_pend) / n_harmful if n_harmful else None}
            (folder / "qc_summary.json").write_text(json.dumps(
                {"criterion": {"name": k}, "detection": detection}))


@pytest.fixture
def crafted(tmp_path) -> dict:
    stages = Stages(DemoConfig(out=tmp_path, **CRAFTED))
    _craft(stages)
    return summary(stages, SCENARIOS)


def _qc(result: dict, key: str, criterion: str) -> dict:
    return next(r for r in result["scenarios"][key]["qc"] if r["criterion"] == criterion)


def test_a_run_trained_again_after_it_was_scored_is_scored_again(tmp_path: Path):
    """A run's test metrics are reused only while they are newer than each of its cycle
    models: rerunning a QC run into its removed folder must not report the old metrics."""
    import os

    st = Stages(DemoConfig(out=tmp_path))
    run = tmp_path / "qc_A_pooled"
    run.mkdir()
    models = [run / f"qc_{part}_{c:03d}.keras" for part in ("encoder", "classifier")
              for c in (10, 11)]
    for i, path in enumerate(models):
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))
    assert not st.scored("qc_A_pooled", run, "qc")  # never scored
    metrics = tmp_path / "inference" / "qc_A_pooled_metrics.csv"
    metrics.parent.mkdir()
    metrics.write_text("cycle,auroc\n")
    os.utime(metrics, (2000, 2000))
    other = run / "tm_encoder_011.keras"  # another run's file in the folder: not this run's
    other.write_bytes(b"")
    os.utime(other, (3000, 3000))
    assert st.scored("qc_A_pooled", run, "qc")
    os.utime(models[-1], (2500, 2500))  # cycle 11 trained again after the scoring
    assert not st.scored("qc_A_pooled", run, "qc")


def test_summary_averages_the_last_cycles(crafted):
    assert crafted["finding_cycles"] == [3, 5]
    assert crafted["clean_auroc"] == pytest.approx(0.80)
    assert crafted["clean_auroc_last"] == pytest.approx(0.70)
    whole = crafted["scenarios"]["whole_centers"]
    assert whole["no_qc_auroc"] == pytest.approx(0.74)
    assert whole["no_qc_auroc_last"] == pytest.approx(0.80)
    r = _qc(crafted, "whole_centers", RECOMMENDED)
    assert r["auroc"] == pytest.approx(0.79)  # cycle 2 (0.5) is not one of the last three
    assert r["auroc_minus_clean"] == pytest.approx(-0.01)
    assert crafted["scenarios"]["clean"]["no_qc_auroc"] == pytest.approx(0.80)
    # finding 1 on the mean: a drop of 0.06 (at the last cycle alone, a rise of 0.10)
    assert findings(crafted)[0].startswith("1. Harmful data degrades the travelling model: "
                                           "**shown**")


def test_summary_counts_pending_as_flagged(crafted):
    r = _qc(crafted, "whole_centers", RECOMMENDED)
    assert (r["harmful_eliminated"], r["harmful_pending"], r["harmful_flagged"]) == \
        pytest.approx((0.9, 0.1, 1.0))
    assert r["per_type_eliminated"] == pytest.approx({"good": 1 / 40, "inverted": 0.9})
    clean = _qc(crafted, "clean", RECOMMENDED)
    assert clean["good_flagged"] == pytest.approx(3 / 42) and clean["harmful"] == 0
    assert clean["harmful_eliminated"] is None
    table = detection_table(crafted).set_index(["scenario", "criterion"])
    row = table.loc[("whole harmful centers", RECOMMENDED)]
    assert (row["harmful eliminated"], row["harmful pending"], row["harmful flagged"]) == \
        ("9/10", "1/10", "10/10")
    assert table.loc[("no harmful image", RECOMMENDED), "good flagged"] == "3/42"
    # QC seconds per cycle against a cycle of the scenario's no-QC run (C: the clean run)
    assert r["qc_to_training"] == pytest.approx(7.0 / TRAINING_SECONDS)
    assert clean["qc_to_training"] == pytest.approx(5.0 / TRAINING_SECONDS)


def test_findings_for_each_criterion_no_best_of(crafted):
    lines = findings(crafted)
    verdict = {line.split(":", 1)[0]: "**shown**" in line for line in lines[1:]}
    assert verdict == {
        # whole centers: the recommended criterion clears every bar; the paper's rule
        # reads "not shown" although the other criterion cleared
        f"2. `{PAPER}`": False, f"2. `{RECOMMENDED}`": True,
        # 90% eliminated against 50%, but 100% flagged against 100%: not more reliable
        f"3. `{PAPER}`": False, f"3. `{RECOMMENDED}`": False,
        # clean data: 3 good images flagged but 2 of 42 (4.8%) eliminated: over the 2% bar
        f"4. `{PAPER}`": True, f"4. `{RECOMMENDED}`": False}
    assert "9/10" not in lines[2] and "90% eliminated (+ 10% pending = 100% flagged)" in lines[2]


def test_the_command_line_gives_the_rules_fixed_in_code(tmp_path: Path):
    """`python -m dqc.demo` reads its flags into a checked config: the paper's rule and the
    recommended criterion, at their defaults, whatever else is set."""
    from dqc.demo import config_from_args, parse_args

    config = config_from_args(parse_args(["--out", str(tmp_path), "--quick"]))
    assert config.criteria == RULES and config.out == tmp_path
