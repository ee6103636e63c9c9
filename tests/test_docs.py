"""The README a newcomer reads: short, every docs/ page linked once, and its demo figures the
demo report's (dqc.readme: generated from summary.json; the check fails on a doctored one)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dqc import readme
from dqc.errors import DQCError
from helpers import ROOT

README = ROOT / "README.md"

#: A summary.json as the demo writes it (two scenarios; rows with nested records too).
SUMMARY = {
    "clean_auroc": 0.878, "clean_auroc_mean": 0.8804, "auroc_cycles": [10, 15],
    "per_type": {"inverted": {"dirty_auroc": 0.818}},
    "scenarios": {
        "whole_centers": {"dirty_auroc": 0.818, "qc": [
            {"criterion": "rates", "params": {"name": "rates", "error": 0.02},
             "auroc": 0.812, "auroc_mean": 0.833, "harmful_eliminated": 0.0625,
             "good_eliminated": 0.0074, "per_type_eliminated": {"inverted": 0.0625}},
            {"criterion": "combined", "params": {"name": "combined", "z": 3.0},
             "auroc": 0.896, "auroc_mean": 0.888, "harmful_eliminated": 0.9375,
             "good_eliminated": 0.0221, "per_type_eliminated": {"inverted": 0.9375}}]},
        "single_images": {"dirty_auroc": 0.943, "qc": [
            {"criterion": "rates", "auroc": 0.936, "auroc_mean": 0.923,
             "harmful_eliminated": None, "good_eliminated": 0.0}]}}}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(SUMMARY))
    page = tmp_path / "README.md"
    page.write_text(f"# A project\n\nText before.\n\n{readme.BEGIN}\n{readme.END}\n\nText after.\n")
    return page, summary


def test_the_block_is_generated_from_the_summary(files: tuple[Path, Path]) -> None:
    page, summary = files
    assert readme.main(["--readme", str(page), "--summary", str(summary)]) == 0
    text = page.read_text()
    assert text.startswith("# A project\n\nText before.\n\n") and text.endswith("\n\nText after.\n")
    block = text[text.index(readme.BEGIN):text.index(readme.END)]
    assert "Clean run: clean_auroc 0.878, clean_auroc_mean 0.880." in block
    assert "- whole_centers, no QC: dirty_auroc 0.818" in block
    assert "| scenario | criterion | auroc | auroc_mean | harmful_eliminated | good_eliminated |" \
        in block
    assert "| whole_centers | combined | 0.896 | 0.888 | 0.938 | 0.022 |" in block
    assert "| single_images | rates | 0.936 | 0.923 | n/a | 0.000 |" in block
    assert "0.0625" not in block and "params" not in block  # rounded; nested records left out


def test_the_check_passes_then_fails_on_a_doctored_number(files: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    page, summary = files
    readme.update(page, summary)
    check = ["--check", "--readme", str(page), "--summary", str(summary)]
    assert readme.main(check) == 0
    good = page.read_text()
    page.write_text(good.replace("| 0.896 |", "| 0.906 |"))  # the README quotes a wrong AUROC
    capsys.readouterr()
    assert readme.main(check) == 1
    out = capsys.readouterr().out
    assert "'| whole_centers | combined | 0.906 | 0.888 | 0.938 | 0.022 |', the report says " \
           "'| whole_centers | combined | 0.896 | 0.888 | 0.938 | 0.022 |'" in out
    page.write_text(good)  # the README as generated, but the report says otherwise
    doctored = json.loads(summary.read_text())
    doctored["scenarios"]["whole_centers"]["qc"][0]["good_eliminated"] = 0.05
    summary.write_text(json.dumps(doctored))
    assert readme.differences(page, summary)
    assert readme.main(check) == 1


def test_a_summary_with_other_keys_still_renders() -> None:
    """A later demo's summary (another scenario, other row keys) renders without changes here."""
    other = {"clean_auroc": 0.5, "scenarios": {"clean": {"no_qc_auroc": 0.5, "qc": [
        {"criterion": "rates", "auroc_last": 0.49, "good_pending": 0.1, "qc_seconds": 3.0}]}}}
    block = readme.render(other, "x.json")
    assert "| scenario | criterion | auroc_last | good_pending |" in block
    assert "| clean | rates | 0.490 | 0.100 |" in block
    with pytest.raises(DQCError, match="no 'scenarios'"):
        readme.render({"clean_auroc": 0.5}, "x.json")


def test_readme_is_short_and_links_every_docs_page_once() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    pages = sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert sorted(links) == pages  # each page once, and no link to a missing page
    assert text.count(readme.BEGIN) == 1 and text.count(readme.END) == 1
