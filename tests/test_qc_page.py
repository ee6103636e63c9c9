"""NAME_report.html: the page a QC run writes after every cycle, as a real browser shows it.

The run is the federated simulation test's tiny single-machine run (`federated_case`: center
C04's labels flipped after pre-training, criterion trainloss, revisit 1; the same flags, so one
run serves both), in which C04's images are flagged in cycle 3 and eliminated in cycle 4. The browser test needs Chromium (`.ci/run` installs it); without one
it skips, and the page is still checked as HTML.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.browser import dump_dom, find_browser, screenshot
from dqc.criteria import make_criterion
from dqc.qc_page import SECTIONS, statistics

CYCLES = 5  # cycles 3..4 after the pre-trained 0..2
FLAGS = ("--criterion", "trainloss", "--window", "10")  # as tests/test_federated_simulation.py


class Page(HTMLParser):
    """The page's section ids, image cards (subject, status) and <img> sources."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.cards: list[tuple[str, str]] = []
        self.images: list[tuple[str, str]] = []  # (class, src)
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "div" and "data-subject" in a:
            self.cards.append((a["data-subject"], a["data-status"]))
        elif tag == "img":
            self.images.append((a.get("class", ""), a.get("src", "")))


@pytest.fixture(scope="module")
def run(federated_case: dict) -> Path:
    return federated_case["single"](CYCLES, *FLAGS)


def _images(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "qc_images.csv", dtype={"Subject": str})


def test_the_page_shows_every_section_and_exactly_the_runs_eliminated_and_pending_images(run):
    images = _images(run)
    assert images.eliminated.sum() > 0, "the case must eliminate images"
    text = (run / "qc_report.html").read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    shown = {s for s, status in page.cards if status == "eliminated"}
    assert shown == set(images.Subject[images.status == "eliminated"])
    assert {s for s, status in page.cards if status == "pending"} == \
        set(images.Subject[images.status == "pending"])
    mosaics = [src for css, src in page.images if css == "mosaic"]
    assert len(mosaics) == len(page.cards)
    assert all(src.startswith("data:image/png;base64,") for _, src in page.images)
    assert not re.search(r"(src|href)=\"(https?:|//)", text), "the page must need no network"
    c04 = images[images.Study == "C04"]
    row = re.search(r"<tr><td>C04</td>(.*?)</tr>", text).group(1)
    cells = [int(v) for v in re.findall(r">(\d+)<", row)]
    assert cells[0] == len(c04) and cells[-2:] == [int(c04.eliminated.sum()), len(c04)]


def test_the_page_opens_in_a_real_browser_and_every_image_decodes(run, tmp_path):
    browser = find_browser()
    if browser is None:
        if os.environ.get("DQC_REQUIRE_BROWSER"):  # set by .ci/run, which installs it
            pytest.fail("no Chromium on PATH, and DQC_REQUIRE_BROWSER is set")
        pytest.skip("no Chromium on PATH (apt-get install chromium; .ci/run installs it)")
    page = run / "qc_report.html"
    shot = screenshot(page, tmp_path / "report.png", browser)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280) and pixels[..., :3].std() > 0.05
    probe = tmp_path / "probe.html"  # a copy with a script that writes what the browser saw
    probe.write_text(page.read_text().replace("</body>", """<script>
      const seen = [...document.images].map(i => [i.className, i.naturalWidth,
        i.naturalHeight, i.closest('[data-subject]')?.dataset.subject || '']);
      const sections = [...document.querySelectorAll('section')].map(s => s.id);
      const pre = document.createElement('pre'); pre.id = 'probe';
      pre.textContent = JSON.stringify({seen, sections}); document.body.appendChild(pre);
    </script></body>"""))
    dom = dump_dom(probe, browser)
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert found["sections"] == list(SECTIONS)
    assert found["seen"] and all(w > 0 and h > 0 for _, w, h, _ in found["seen"])
    images = _images(run)
    shown = {s for css, _, _, s in found["seen"] if css == "mosaic"}
    assert set(images.Subject[images.status == "eliminated"]) <= shown


def test_the_paper_rules_statistic_is_the_rise_over_the_last_accepted_update():
    log = pd.DataFrame({"Cycle": [0, 3, 3, 3, 3], "Subject": ["n/a", "batch", "a", "b", "batch"],
                        "Study": ["n/a", "C1", "C1", "C1", "C2"],
                        "PFP": [0.1, 0.1, 0.1, 0.25, 0.2], "PFN": [0.2, 0.5, 0.2, 0.2, 0.2],
                        "Ignored": [0, 1, 0, 1, 0]})
    out = statistics(log, make_criterion("rates", error=0.02))
    assert math.isnan(out.STATISTIC[0])
    np.testing.assert_allclose(out.STATISTIC[1:], [0.3, 0.0, 0.15, 0.1])
    np.testing.assert_allclose(out.LIMIT[[2, 3]], [0.02, 0.02])
    assert out.LIMIT[[0, 1, 4]].isna().all()


def test_no_report_writes_no_page(federated_case: dict):
    out = federated_case["single"](4, "--no-report")
    assert (out / "qc_images.csv").is_file() and not (out / "qc_report.html").exists()


def test_a_node_writes_its_own_page_and_refuses_other_centers_decisions(cohort: dict,
                                                                        tmp_path: Path):
    """What the server tells a center (ids and numbers) becomes the center's page with its
    images' mosaics; decisions about images it does not hold, or a malformed message, are
    refused in one line."""
    import base64

    from dqc.errors import DQCError
    from dqc.federated.messages import read_report_request, report_request
    from dqc.federated.node import CenterNode
    from dqc.federated.simulate import split_by_center
    from dqc.plots import mosaic_png

    (csv, _), (other_csv, _) = split_by_center(cohort["train"], tmp_path / "nodes")[:2]
    node = CenterNode(csv)
    mine, theirs = (pd.read_csv(c, dtype={"Subject": str}) for c in (csv, other_csv))
    gone = mine.Subject[0]
    row = {"Subject": gone, "Study": node.center, "times_flagged": 2, "first_flagged_cycle": 3,
           "revisit_cycle": 4, "eliminated": 1, "eliminated_cycle": 4, "status": "eliminated"}
    kept = [{**row, "Subject": s, "times_flagged": 0, "first_flagged_cycle": None,
             "revisit_cycle": None, "eliminated": 0, "eliminated_cycle": None, "status": "kept"}
            for s in mine.Subject[1:]]
    log = [{"Cycle": c, "Subject": gone, "Study": node.center, "ACC": 0.5, "FP": 1, "FN": 2,
            "PFP": 0.2, "PFN": 0.4, "Ignored": 1, "STATISTIC": 0.25, "LIMIT": 0.02}
           for c in (3, 4)]  # the statistic as the server computed it on the whole log
    payload = {"name": "qc", "center": node.center, "cycle": 4, "planned": [3, 4],
               "criterion": {"name": "rates", "error": 0.02}, "settings": {"revisit R": "1"},
               "images": [row, *kept], "log": log}
    node.report(read_report_request(report_request(payload)), tmp_path / "pages")
    page = (tmp_path / "pages" / f"qc_report_{node.center}.html").read_text()
    assert re.findall(r'data-subject="([^"]+)"', page) == [gone]
    assert base64.b64encode(mosaic_png(mine.Path[0])).decode() in page
    assert page.count("harmful, undone (statistic 0.25, limit 0.02)") == 2
    node.report(payload, None)  # no folder: nothing written, nothing refused
    stolen = {**payload, "images": [{**row, "Subject": theirs.Subject[0]}]}
    with pytest.raises(DQCError, match=rf"center {node.center}: report about another center"):
        node.report(stolen, tmp_path / "pages")
    with pytest.raises(DQCError, match="malformed report message"):
        node.report({"center": node.center}, tmp_path / "pages")


def test_the_page_names_the_centers_left_unjudged():
    """`abstaining` leaves the centers of one label unjudged: the page says which, and a
    run that left none says nothing about it."""
    from dqc import qc_report
    from dqc.qc_page import PageData, render
    criterion = make_criterion("abstaining")
    log = pd.DataFrame([{"Cycle": 10, "Subject": "batch", "Study": "C06", "ACC": math.nan,
                         "FP": math.nan, "FN": math.nan, "PFP": math.nan, "PFN": math.nan,
                         "Ignored": 0, "VAL_LOSS": math.nan, "VAL_AUROC": math.nan,
                         "TRAIN_LOSS": 0.9, "STATISTIC": 0.9, "LIMIT": math.nan}])
    images = pd.DataFrame([{c: None for c in qc_report.IMAGE_COLUMNS}]).iloc[:0]
    pages = [render(PageData("t", log, images, {}, criterion, (10, 13), figures=False,
                             unjudged=unjudged), 10) for unjudged in (["C06", "C12"], [])]
    assert "Left unjudged (every training image of one label" in pages[0]
    assert "C06, C12." in pages[0]
    assert "Left unjudged" not in pages[1]
