"""The study's table and plot from stand-in run results: crafted summary.json files of four
seeds (one tuning seed), no training."""

import json

import pandas as pd
import pytest

from dqc.demo import RULES
from dqc.study import collect_rows, seed_folder, write_study

PAPER, RECOMMENDED = RULES
#: Per seed: scenario A, recommended criterion: (harmful eliminated, harmful flagged, good
#: eliminated, AUROC - clean, QC cycle / training cycle). Seed 1 tunes, far off the rest.
FIGURES = {1: (0.10, 0.10, 0.50, -0.30, 9.0),
           2: (0.90, 1.00, 0.01, -0.01, 2.0),
           3: (0.95, 0.95, 0.02, +0.01, 3.0),
           4: (1.00, 1.00, 0.03, -0.03, 4.0)}


def _qc(criterion: str, figures: tuple) -> dict:
    elim, flagged, good, d_auroc, ratio = figures
    return {"criterion": criterion, "harmful_eliminated": elim, "harmful_flagged": flagged,
            "good_eliminated": good, "good_flagged": good, "auroc_minus_clean": d_auroc,
            "qc_seconds_per_cycle": 10 * ratio, "qc_to_training": ratio}


def _summary(seed: int) -> dict:
    paper = _qc(PAPER, (0.0, 0.0, 0.0, -0.05, 1.5))
    clean_paper = {**_qc(PAPER, (0, 0, 0.0, 0.0, 1.5)), "harmful_eliminated": None,
                   "harmful_flagged": None}
    return {"scenarios": {
        "whole_centers": {"scenario": "A", "title": "whole harmful centers",
                          "qc": [paper, _qc(RECOMMENDED, FIGURES[seed])]},
        "clean": {"scenario": "C", "title": "no harmful image", "qc": [clean_paper]}}}


@pytest.fixture
def study(tmp_path):
    for seed in FIGURES:
        report = seed_folder(tmp_path, seed) / "report"
        report.mkdir(parents=True)
        (report / "summary.json").write_text(json.dumps(_summary(seed)))
    rows = collect_rows(tmp_path, list(FIGURES), {1})
    write_study(rows, tmp_path, [2, 3, 4], [1])
    return tmp_path


def test_table_is_mean_and_range_over_untuned_seeds(study):
    table = pd.read_csv(study / "study.csv").set_index(["scenario", "criterion"])
    row = table.loc[("A", RECOMMENDED)]
    assert row.seeds == "2,3,4"  # the tuning seed is left out
    assert (row.harmful_eliminated_mean, row.harmful_eliminated_min,
            row.harmful_eliminated_max) == pytest.approx((0.95, 0.90, 1.00))
    assert (row.harmful_flagged_mean, row.harmful_flagged_min) == \
        pytest.approx((2.95 / 3, 0.95))
    assert (row.good_eliminated_mean, row.good_eliminated_max) == pytest.approx((0.02, 0.03))
    assert (row.auroc_minus_clean_mean, row.auroc_minus_clean_min,
            row.auroc_minus_clean_max) == pytest.approx((-0.01, -0.03, 0.01))
    assert (row.qc_to_training_mean, row.qc_to_training_min, row.qc_to_training_max) == \
        pytest.approx((3.0, 2.0, 4.0))
    assert table.loc[("A", PAPER)].harmful_eliminated_max == 0
    # no harmful image: no harmful figure, the good ones still there
    clean = table.loc[("C", PAPER)]
    assert pd.isna(clean.harmful_eliminated_mean) and clean.good_eliminated_mean == 0
    seeds = pd.read_csv(study / "study_seeds.csv")
    assert len(seeds) == 4 * 3 and seeds[seeds.tuning].seed.unique().tolist() == [1]


def test_markdown_and_plot(study):
    text = (study / "study.md").read_text()
    untuned, tuning = text.split("## Tuning seeds")
    assert "## Untuned seeds (2, 3, 4)" in untuned
    assert (f"| A (whole harmful centers) | `{RECOMMENDED}` | 2,3,4 | 95.0% [90.0%, 100.0%] |"
            in untuned)
    assert "-0.010 [-0.030, +0.010]" in untuned and "3 [2, 4]" in untuned
    assert "10.0% [10.0%, 10.0%]" in tuning and "10.0% [10.0%" not in untuned
    assert (study / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_seed_runs_the_criteria_given_or_the_rules(tmp_path):
    from dqc.errors import DQCError
    from dqc.study import parse_args, seed_configs

    default = seed_configs(parse_args(["--out", str(tmp_path)]))
    assert [c.seed for c in default] == [31, 32, 33]  # the untuned seeds
    assert RULES == ("rates", "pooled")
    assert all(c.criteria == ("rates", "pooled", "centered")
               and c.out == seed_folder(tmp_path, c.seed)
               for c in default)
    given = seed_configs(parse_args(["--out", str(tmp_path), "--seeds", "3,4",
                                     "--criteria", "rates, witnessed,confirmed"]))
    assert [(c.seed, c.criteria) for c in given] == \
        [(s, ("rates", "witnessed", "confirmed")) for s in (3, 4)]
    with pytest.raises(DQCError, match="--criteria: unknown vibes"):
        seed_configs(parse_args(["--out", str(tmp_path), "--criteria", "rates,vibes"]))
