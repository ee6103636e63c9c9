"""NAME_report.html: what a QC run did, on one self-contained page a researcher opens from disk.

The page holds the run's settings and threshold, the validation figure over the updates, a
table per center, and for every eliminated and pending image its three orthogonal middle
slices (a PNG mosaic), its label and every try with the criterion's statistic; with the
`Harmful` ground truth, the detection figures. Images are embedded as base64 PNG: no file
beside it, no network. The page is rewritten (atomically) after every cycle.

Pixels appear only where the images are: the federated server's page has the tables and
figures but no mosaic (its training table has no paths); each center's node, told the
decisions about its own images (`center_payload`), writes its own page with their mosaics.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

from dqc import qc_report
from dqc.io import write_text
from dqc.plots import mosaic_png, png_bytes, qc_log_figure, qc_statistic_figure
from dqc.criteria import FLAGS, Criterion, make_criterion

if TYPE_CHECKING:
    from dqc.qc import QualityControl
    from dqc.runs import QCSpec, RunSpec

#: The page's sections, by HTML id, in order (the detection one only with `Harmful`).
SECTIONS = ("next", "settings", "validation", "centers", "images", "detection")
LABELS = {0: "HC", 1: "PD"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#1d2330;font-size:14px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:26px 0 8px;
 border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5b6474;margin:0 0 10px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:4px 18px 14px;
 margin:14px 0}
#next{background:#fff8e6;border-color:#f0d79a}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;text-align:left;
 border-bottom:1px solid #eceef2}th{background:#f1f3f6;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;display:block;margin:8px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{border:1px solid #e1e4ea;border-radius:6px;padding:8px 10px;background:#fcfcfd}
.card h3{font-size:14px;margin:0 0 4px}
img.mosaic{width:100%;image-rendering:pixelated;background:#000;display:block;margin:4px 0}
.tag{display:inline-block;border-radius:4px;padding:0 6px;font-size:12px;margin-left:4px}
.eliminated{background:#f8d7da;color:#842029}.pending{background:#fff3cd;color:#664d03}
.good{background:#d1e7dd;color:#0f5132}.harmful{background:#e2d9f3;color:#432874}
.tries{margin:4px 0 0;padding-left:18px;font-size:12.5px}
code{background:#f1f3f6;padding:1px 4px;border-radius:3px}
.note{color:#5b6474}
"""


@dataclass
class PageData:
    """Everything one page shows. `mosaic(subject)` gives an image's PNG, or is None where
    the images are not (the federated server)."""

    title: str
    log: pd.DataFrame
    images: pd.DataFrame
    settings: dict[str, str]
    criterion: Criterion
    planned: tuple[int, int]
    labels: dict[str, int] = field(default_factory=dict)
    mosaic: Callable[[str], bytes] | None = None
    figures: bool = True
    where_images: str = ""
    unjudged: Sequence[str] = ()  # centers the criterion left unjudged (`abstaining`)


# --- numbers ---------------------------------------------------------------------------------

def threshold_text(criterion: Criterion) -> str:
    """The rule as it was set, in one sentence: what the criterion compares (its own
    summary) and its parameters' values."""
    values = ", ".join(f"{FLAGS[k]} {v:g}" for k, v in criterion.parameters().items()
                       if k != "name")
    return f"{criterion.summary} ({values})" if values else criterion.summary


def statistics(log: pd.DataFrame, criterion: Criterion) -> pd.DataFrame:
    """The log with STATISTIC and LIMIT for every row. The paper's rule does not log them:
    its statistic is the larger rise of the two rates over the last accepted row's, its
    limit k x error (k = 1 for one image; a batch's k is not logged: no limit shown)."""
    if "STATISTIC" in log.columns:
        return log
    out = log.copy()
    rises, ref = [], None
    for pfp, pfn, ignored in zip(pd.to_numeric(log.PFP, errors="coerce"),
                                 pd.to_numeric(log.PFN, errors="coerce"), log.Ignored):
        rises.append(max(pfp - ref[0], pfn - ref[1]) if ref is not None else math.nan)
        if int(ignored) == 0:
            ref = (pfp, pfn)
    out["STATISTIC"] = rises
    out["LIMIT"] = np.where(log.Subject.isin(["batch", "n/a"]), math.nan, criterion.error)
    return out


def center_table(log: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Per center: images, updates checked, undone, flagged, pending, eliminated (harmful)."""
    updates = log[log.Subject != "n/a"].groupby("Study").agg(
        updates=("Ignored", "size"), undone=("Ignored", "sum"))
    per = images.assign(flagged=images.times_flagged > 0, pending=images.status == "pending")
    columns = {"images": ("Subject", "size"), "flagged": ("flagged", "sum"),
               "pending": ("pending", "sum"), "eliminated": ("eliminated", "sum")}
    if "Harmful" in per.columns:
        columns["harmful"] = ("Harmful", "sum")
    table = per.groupby("Study", sort=True).agg(**columns).join(updates, how="left")
    order = ["images", "updates", "undone", "flagged", "pending", "eliminated"]
    table = table.fillna(0).astype(int)[order + [c for c in table.columns if c not in order]]
    table.loc["total"] = table.sum()
    return table


def shown_images(images: pd.DataFrame) -> pd.DataFrame:
    """The images a researcher should look at: eliminated (by cycle), then pending."""
    shown = images[images.status.isin(["eliminated", "pending"])].copy()
    shown["order"] = (shown.status != "eliminated").astype(int)
    return shown.sort_values(["order", "eliminated_cycle", "Study", "Subject"],
                             na_position="last").drop(columns="order")


def next_step(data: PageData, done: int) -> str:
    """The short "what to do next" line."""
    images = data.images
    eliminated = int((images.status == "eliminated").sum())
    pending = int((images.status == "pending").sum())
    first, last = data.planned
    progress = (f"Cycles {first}..{done} of {first}..{last} done; this page is rewritten after "
                "every cycle. " if done < last else "")
    if not eliminated and not pending:
        return progress + ("Nothing is eliminated or waiting for a retry: no image to look at; "
                           "the training set passed this criterion so far.")
    look = (f"Look at the {eliminated} eliminated and {pending} pending image(s) listed below"
            + (f" (no pixels here: {data.where_images})" if data.mosaic is None else "") + ". ")
    action = ("If they look broken, remove the eliminated rows (status <code>eliminated</code> "
              "in <code>NAME_images.csv</code>) from the training CSV and re-run; if they look "
              "fine, the criterion is too strict for this data: raise its threshold.")
    return progress + look + action


# --- HTML ------------------------------------------------------------------------------------

def _esc(value: object) -> str:
    return html.escape(str(value))


def _img(png: bytes, css: str, alt: str) -> str:
    return (f'<img class="{css}" alt="{_esc(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def _table(frame: pd.DataFrame, index: bool = True) -> str:
    frame = frame.reset_index() if index else frame
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    css = [' class="n"' if n else "" for n in numeric]
    head = "".join(f"<th{c}>{_esc(name)}</th>" for name, c in zip(frame.columns, css))
    rows = "".join("<tr>" + "".join(f"<td{c}>{_esc(v)}</td>" for v, c in zip(row, css))
                   + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _number(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4g}"


def _cycle(value: object) -> str:
    return "-" if pd.isna(value) else str(int(value))


def _card(row, tries: pd.DataFrame, data: PageData) -> str:
    status = f'<span class="tag {row.status}">{row.status}</span>'
    truth = ""
    if "Harmful" in data.images.columns:
        kind = "harmful" if int(row.Harmful) else "good"
        truth = f'<span class="tag {kind}">{kind} (ground truth)</span>'
    label = data.labels.get(row.Subject)
    label = f" &middot; label {LABELS[int(label)]}" if label is not None else ""
    when = (f"retried in cycle {_cycle(row.revisit_cycle)} &middot; eliminated in cycle "
            f"{_cycle(row.eliminated_cycle)}" if row.status == "eliminated"
            else f"retry due in cycle {_cycle(row.revisit_cycle)}")
    picture = _img(data.mosaic(row.Subject), "mosaic", f"{row.Subject}: axial, coronal, "
                   "sagittal middle slices") if data.mosaic else ""
    lines = "".join(
        f"<li>cycle {int(t.Cycle)}: {'harmful, undone' if t.Ignored else 'passed'} "
        f"(statistic {_number(t.STATISTIC)}, limit {_number(t.LIMIT) or '-'})</li>"
        for t in tries.itertuples())
    return (f'<div class="card" data-subject="{_esc(row.Subject)}" data-status="{row.status}">'
            f"<h3>{_esc(row.Subject)}{status}{truth}</h3>{picture}"
            f"<div>center <b>{_esc(row.Study)}</b>{label} &middot; first flagged in cycle "
            f"{_cycle(row.first_flagged_cycle)} &middot; {when}</div>"
            f'<ul class="tries">{lines}</ul></div>')


def _detection(data: PageData, done: int) -> str:
    summary = qc_report.summarize(data.images, data.log, range(data.planned[0], done + 1),
                                  data.criterion)["detection"]
    shown = {k: v for k, v in summary.items()
             if k not in ("per_center", "cycles_first_flag_to_elimination")}
    table = pd.DataFrame({"figure": [k.replace("_", " ") for k in shown], "value": [
        _number(v) if isinstance(v, float) else ("-" if v is None else v)
        for v in shown.values()]})
    good = data.images[(data.images.eliminated == 1) & (data.images.Harmful == 0)]
    listed = ", ".join(f"{s} ({c})" for s, c in zip(good.Subject, good.Study)) or "none"
    return (_table(table, index=False)
            + f"<p>Eliminated images that were good (ground truth): {_esc(listed)}</p>")


def render(data: PageData, done: int) -> str:
    """The whole page as HTML, after cycle `done`."""
    log = statistics(data.log, data.criterion)
    shown = shown_images(data.images)
    settings = pd.DataFrame({"setting": list(data.settings), "value": list(data.settings.values())})
    parts = [f"<h1>{_esc(data.title)}</h1>",
             f'<p class="sub">after cycle {done} &middot; criterion '
             f"<b>{_esc(data.criterion.name)}</b>: {_esc(threshold_text(data.criterion))}</p>",
             f'<section id="next"><h2>What to do next</h2><p>{next_step(data, done)}</p>'
             "</section>",
             f'<section id="settings"><h2>Settings</h2>{_table(settings, index=False)}'
             f"<p>Threshold: {_esc(threshold_text(data.criterion))}.</p>"
             + (f"<p>Left unjudged (every training image of one label, so the batch loss "
                f"cannot tell): {_esc(', '.join(data.unjudged))}.</p>" if data.unjudged else "")
             + "</section>"]
    if data.figures:
        rates = "STATISTIC" not in data.criterion.log_columns()  # the paper's log: rates
        draw = qc_log_figure if rates else qc_statistic_figure
        figure = draw(data.log if rates else log, data.images, title="the check of every update")
        what = ("FPR and FNR on the validation set after every update" if rates
                else "the criterion's statistic of every update and its limit")
        heading = "Validation over the updates" if rates else "The criterion over the updates"
        parts.append(f'<section id="validation"><h2>{heading}</h2>'
                     f'<p class="note">{what}; crosses: updates undone; triangles: '
                     f'eliminations; grey lines: cycle starts.</p>'
                     f'{_img(png_bytes(figure), "plot", "validation figure")}</section>')
    parts.append(f'<section id="centers"><h2>Per center</h2>'
                 f"{_table(center_table(data.log, data.images).rename_axis('center'))}"
                 "</section>")
    cards = "".join(_card(row, log[log.Subject == row.Subject], data)
                    for row in shown.itertuples())
    note = "" if data.mosaic else (f'<p class="note">No pixels here: {_esc(data.where_images)}.'
                                   "</p>")
    parts.append(f'<section id="images"><h2>Eliminated and pending images ({len(shown)})</h2>'
                 f"{note}<div class=\"cards\">{cards or '<p>none</p>'}</div></section>")
    if "Harmful" in data.images.columns:
        parts.append(f'<section id="detection"><h2>Detection (ground truth)</h2>'
                     f"{_detection(data, done)}</section>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(data.title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


# --- the QC run's hook -----------------------------------------------------------------------

def settings(spec: "RunSpec", qspec: "QCSpec") -> dict[str, str]:
    """The run's settings as the page shows them."""
    return {"training CSV": spec.train_csv or "the centers' nodes (federated)",
            "validation CSV": qspec.val_csv or "the centers' own validation images",
            "start model": f"{spec.encoder}, {spec.classifier}",
            "cycles": f"{spec.cycles.start}..{spec.cycles.stop - 1}",
            "batch size": str(spec.batch_size), "revisit R": str(qspec.revisit),
            "criterion": ", ".join(f"{k} {v}" if k != "name" else v
                                   for k, v in qspec.rule().parameters().items()),
            "rates": "authors' denominators" if qspec.legacy_rates else "FP/HC, FN/PD",
            "learning rate": spec.lr_schedule, "seed": str(spec.seed),
            "outputs": str(Path(spec.out) / f"{qspec.name}*")}


class Mosaics:
    """Each image's mosaic PNG, read once per run (an image does not change between cycles)."""

    def __init__(self, paths: dict[str, str]):
        self.paths, self._done = paths, {}

    def __call__(self, subject: str) -> bytes:
        if subject not in self._done:
            self._done[subject] = mosaic_png(self.paths[subject])
        return self._done[subject]


class Reporter:
    """The QC run's `on_cycle` hook: NAME_report.html in the output folder after each cycle.

    With image paths in the training table the page shows the mosaics; without (the
    federated server), none."""

    def __init__(self, spec: "RunSpec", qspec: "QCSpec", train: pd.DataFrame):
        self.path = Path(spec.out) / f"{qspec.name}_report.html"
        self.train, self.criterion = train, qspec.rule()
        self.settings = settings(spec, qspec)
        self.planned = (spec.cycles.start, spec.cycles.stop - 1)
        here = "Path" in train.columns
        self.mosaic = Mosaics(dict(zip(train.Subject, train.Path))) if here else None
        self.where = "" if here else ("each image stays at its center, whose node, run with "
                                      "--report DIR, shows it on the center's own page")

    def __call__(self, policy: "QualityControl", cycle: int) -> None:
        labels = dict(zip(self.train.Subject, self.train.Group_bin)) \
            if "Group_bin" in self.train.columns else {}
        data = PageData(f"Quality control: {self.path.stem.removesuffix('_report')}",
                        qc_report.log_frame(policy), qc_report.image_table(policy, self.train),
                        self.settings, self.criterion, self.planned, labels, self.mosaic,
                        where_images=self.where, unjudged=policy.unjudged)
        write_text(self.path, render(data, cycle))


def cycle_hook(spec: "RunSpec", qspec: "QCSpec", train: pd.DataFrame,
               also: Callable[["QualityControl", int], None] | None = None
               ) -> Callable[["QualityControl", int], None] | None:
    """What runs after each QC cycle: the report (unless `qspec.report` is off), then `also`
    (the federated server tells each center the decisions about its images)."""
    hooks = ([Reporter(spec, qspec, train)] if qspec.report else []) + \
        ([also] if also else [])
    if not hooks:
        return None

    def run(policy: "QualityControl", cycle: int) -> None:
        for hook in hooks:
            hook(policy, cycle)
    return run


# --- a center's own page (federated) ---------------------------------------------------------

def center_payload(policy: "QualityControl", train: pd.DataFrame, center: str, cycle: int,
                   page_settings: dict[str, str], planned: tuple[int, int], name: str) -> dict:
    """What the server tells one center after a cycle: the QC decisions about its own
    images (the per-image table's rows and its log rows, with the statistic each update was
    judged by, which under the paper's rule needs the whole log) and the settings; ids and
    numbers only, never a pixel."""
    log = statistics(qc_report.log_frame(policy), policy.criterion)
    images = qc_report.image_table(policy, train)
    mine = images[images.Study == center]

    def records(frame: pd.DataFrame) -> list[dict]:
        return [{k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v))
                 for k, v in row.items()} for row in frame.to_dict("records")]
    return {"name": name, "center": center, "cycle": cycle, "planned": list(planned),
            "criterion": policy.criterion.parameters(), "settings": page_settings,
            "images": records(mine), "log": records(log[log.Study == center])}


def write_center_page(folder: str | Path, payload: dict, paths: dict[str, str],
                      labels: dict[str, int]) -> Path:
    """FOLDER/NAME_report_CENTER.html: the center's own flagged images with their mosaics,
    from the server's `center_payload` and the node's own image paths."""
    params = dict(payload["criterion"])
    criterion = make_criterion(params.pop("name"), **params)
    images = pd.DataFrame(payload["images"], columns=qc_report.IMAGE_COLUMNS
                          + (["Harmful"] if payload["images"] and "Harmful" in
                             payload["images"][0] else []))
    for column in ("first_flagged_cycle", "revisit_cycle", "eliminated_cycle"):
        images[column] = images[column].astype("Int64")
    columns = list(criterion.log_columns())  # the paper's log lacks them: the server adds them
    columns += [c for c in ("STATISTIC", "LIMIT") if c not in columns]
    log = pd.DataFrame(payload["log"], columns=columns)
    center = payload["center"]
    data = PageData(f"Quality control at center {center}: {payload['name']}", log, images,
                    payload["settings"], criterion, tuple(payload["planned"]), labels,
                    Mosaics(paths), figures=False)
    path = Path(folder) / f"{payload['name']}_report_{center}.html"
    write_text(path, render(data, int(payload["cycle"])))
    return path
