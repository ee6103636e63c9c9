"""The demo's report: README.md with results, detection and the findings; summary.json.

Every figure comes from the run's own files (inference metrics, QC summaries and image tables,
each run's seconds per cycle, the detectability instrument), so the report can be rebuilt
from a finished demo folder. The findings are stated for each criterion the demo ran, never
for the best of them, and on the mean test AUROC over the last K cycles
(`DemoConfig.finding_cycles`): one cycle's AUROC swings by a few points.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from dqc.data import load_table
from dqc.demo import Scenario, cycle_seconds
from dqc.harmful import make_harmful
from dqc.io import write_bytes, write_csv, write_json, write_text
from dqc.plots import plot_montage, plot_qc_log, plot_runs

TABLE_METRICS = ("accuracy", "sensitivity", "specificity", "auroc", "f1")
#: The issue's bars for the findings (test AUROC points, fractions of images).
HARM_DROP = 0.05
CLEAN_MARGIN = 0.02
CAUGHT, SPARED = 0.90, 0.03
#: Scenario C (no harmful image): good images QC may eliminate at most.
SPARED_CLEAN = 0.02


# --- reading a finished demo -------------------------------------------------------------

def _metrics(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "inference" / f"{name}_metrics.csv")


def finding_cycles(config) -> range:
    """The cycles whose test AUROC the findings average: the last K of the run."""
    return range(config.cycles - config.finding_cycles, config.cycles)


def auroc(out: Path, name: str, cycles: range) -> tuple[float, float]:
    """(mean test AUROC over `cycles`, test AUROC at the last cycle) of one run."""
    m = _metrics(out, name)
    missing = sorted(set(cycles) - set(m.cycle))
    if missing:
        raise ValueError(f"{name}: no test metrics for cycle(s) {missing}")
    return (float(m[m.cycle.isin(cycles)].auroc.mean()),
            float(m.loc[m.cycle.idxmax(), "auroc"]))


def results_table(out: Path, names: list[str], cycles: range) -> pd.DataFrame:
    """Test metrics at the last cycle, and the findings' mean AUROC over `cycles`."""
    rows = []
    for name in names:
        m = _metrics(out, name)
        last = m.loc[m.cycle.idxmax()]
        rows.append({"run": name, "cycle": int(last.cycle),
                     **{k: round(float(last[k]), 3) for k in TABLE_METRICS},
                     f"mean auroc {cycles.start}..{cycles.stop - 1}":
                         round(auroc(out, name, cycles)[0], 3)})
    return pd.DataFrame(rows)


def _qc_summary(folder: Path) -> dict:
    return json.loads((folder / "qc_summary.json").read_text())


def per_type_counts(folder: Path, scenario_csv: Path) -> dict[str, tuple[int, int]]:
    """(eliminated, total) per harmful type, and for the good images, in one QC run."""
    images = pd.read_csv(folder / "qc_images.csv", dtype={"Subject": str})
    kinds = pd.read_csv(scenario_csv, dtype={"Subject": str, "HarmfulType": str})[
        ["Subject", "HarmfulType"]]
    images = images.merge(kinds, on="Subject", how="left")
    images["kind"] = images.HarmfulType.fillna("").replace("", "good")
    return {kind: (int(g.eliminated.sum()), len(g)) for kind, g in images.groupby("kind")}


def mean_seconds(folder: Path, cycles: range) -> float | None:
    """A run's mean wall seconds per cycle over `cycles` (None where it was not timed)."""
    seconds = cycle_seconds(folder)
    known = [seconds[c] for c in cycles if c in seconds]
    return float(np.mean(known)) if known else None


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def qc_result(stages, scenario: str, criterion: str, clean: float,
              training_seconds: float | None) -> dict:
    """One QC run's figures: detection (eliminated, pending, flagged = eliminated + pending),
    test AUROC against clean, and its seconds per cycle against a training cycle."""
    c = stages.config
    folder = stages.qc_dir(scenario, criterion)
    qc = _qc_summary(folder)
    d = qc["detection"]
    mean, last = auroc(stages.out, f"qc_{scenario}_{criterion}", finding_cycles(c))
    seconds = mean_seconds(folder, range(c.pretrain, c.cycles))
    result = {"criterion": criterion, "params": qc.get("criterion"),
              "auroc": mean, "auroc_last": last, "auroc_minus_clean": mean - clean,
              "harmful": d["harmful"], "good": d["good"]}
    for kind in ("harmful", "good"):
        eliminated, pending = d[f"{kind}_eliminated"], d[f"{kind}_pending"]
        result.update({f"{kind}_eliminated": _share(eliminated, d[kind]),
                       f"{kind}_pending": _share(pending, d[kind]),
                       f"{kind}_flagged": _share(eliminated + pending, d[kind])})
    result["harmful_flagged_ever"] = d["flagged_tpr"]
    result["per_type_eliminated"] = {
        k: _share(*v) for k, v in per_type_counts(folder, stages.scenario_csv(scenario)).items()}
    result["qc_seconds_per_cycle"] = seconds
    result["qc_to_training"] = _ratio(seconds, training_seconds)
    return result


def scenario_result(stages, letter: str, scenario: Scenario, clean: float) -> dict:
    """A scenario's no-QC run and each criterion's QC run."""
    c = stages.config
    no_qc = stages.no_qc_run(letter)
    mean, last = auroc(stages.out, no_qc, finding_cycles(c))
    training = mean_seconds(stages.runs()[no_qc][0], range(c.pretrain, c.cycles))
    return {"scenario": letter, "title": scenario.title, "no_qc_run": no_qc,
            "no_qc_auroc": mean, "no_qc_auroc_last": last,
            "training_seconds_per_cycle": training,
            "qc": [qc_result(stages, letter, k, clean, training) for k in c.criteria]}


def summary(stages, scenarios: dict[str, Scenario]) -> dict:
    """summary.json: the clean run's AUROC; per harmful type its dirty AUROC; per scenario
    its no-QC AUROC and each criterion's result. AUROCs: the mean over `finding_cycles`."""
    out, c = stages.out, stages.config
    cycles = finding_cycles(c)
    clean, clean_last = auroc(out, "clean", cycles)
    result = {"finding_cycles": [cycles.start, cycles.stop - 1],
              "criteria": list(c.criteria), "stage_seconds": stages.seconds,
              "clean_auroc": clean, "clean_auroc_last": clean_last,
              "per_type": {}, "scenarios": {}}
    for t in c.types:
        dirty, dirty_last = auroc(out, stages.type_run(t), cycles)
        result["per_type"][t] = {"dirty_auroc": dirty, "dirty_auroc_last": dirty_last}
    for s, scenario in scenarios.items():
        result["scenarios"][scenario.key] = scenario_result(stages, s, scenario, clean)
    return result


# --- the findings: one statement per criterion, each against its bars --------------------

def _shown(flag: bool) -> str:
    return "shown" if flag else "not shown"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _caught(r: dict, kind: str) -> str:
    """'E% eliminated (+ P% pending = F% flagged)' of the harmful or good images."""
    return (f"{_pct(r[f'{kind}_eliminated'])} eliminated (+ {_pct(r[f'{kind}_pending'])} "
            f"pending = {_pct(r[f'{kind}_flagged'])} flagged)")


def _cost(r: dict) -> str:
    seconds, ratio = r.get("qc_seconds_per_cycle"), r.get("qc_to_training")
    if seconds is None:
        return "QC cycle not timed"
    return f"QC {seconds:.0f} s per cycle" + (f", {ratio:.1f}x a training cycle"
                                              if ratio is not None else "")


def _finding(label: str, claim: str, shown: bool, detail: str) -> str:
    """'LABEL CLAIM: **shown** (DETAIL).' """
    return f"{label} {claim}: **{_shown(shown)}** ({detail})."


def harm_finding(result: dict) -> str:
    """Finding 1: whole harmful centers lower the test AUROC by at least HARM_DROP."""
    clean = result["clean_auroc"]
    whole, single = (result["scenarios"][k] for k in ("whole_centers", "single_images"))
    drop = clean - whole["no_qc_auroc"]
    per_type = ", ".join(f"{t} {v['dirty_auroc']:.3f}" for t, v in result["per_type"].items())
    return _finding("1.", "Harmful data degrades the travelling model", drop >= HARM_DROP,
                    f"test AUROC: clean {clean:.3f}, whole harmful centers (no QC) "
                    f"{whole['no_qc_auroc']:.3f}, drop {drop:+.3f}, bar {HARM_DROP}; single "
                    f"harmful images {single['no_qc_auroc']:.3f}; per type, whole centers of "
                    f"only that type: {per_type}")


def repair_finding(r: dict, clean: float) -> str:
    """Finding 2 for one criterion: QC of whole harmful centers brings the model back."""
    ok = (r["harmful_eliminated"] >= CAUGHT and r["good_eliminated"] <= SPARED
          and abs(r["auroc_minus_clean"]) <= CLEAN_MARGIN)
    return _finding(f"2. `{r['criterion']}`:", "quality control brings the model back to "
                    "clean", ok, f"bars: >= {CAUGHT:.0%} harmful and <= {SPARED:.0%} good "
                    f"eliminated, AUROC within {CLEAN_MARGIN} of clean {clean:.3f}; whole "
                    f"centers: harmful {_caught(r, 'harmful')}, good {_caught(r, 'good')}, "
                    f"AUROC {r['auroc']:.3f}")


def whole_vs_single_finding(whole: dict, single: dict) -> str:
    """Finding 3 for one criterion: whole centers' images are found more than single images,
    eliminated and flagged (eliminated + pending) alike."""
    more = all(whole[k] > single[k] for k in ("harmful_eliminated", "harmful_flagged"))
    return _finding(f"3. `{whole['criterion']}`:", "whole harmful centers are found more "
                    "reliably than single harmful images", more, f"whole centers "
                    f"{_caught(whole, 'harmful')}; single images {_caught(single, 'harmful')}")


def clean_cost_finding(r: dict, no_qc: float) -> str:
    """Scenario C for one criterion: what QC costs when no image is harmful."""
    ok = r["good_eliminated"] <= SPARED_CLEAN and abs(r["auroc"] - no_qc) <= CLEAN_MARGIN
    return _finding(f"4. `{r['criterion']}`:", "on clean data quality control costs little", ok,
                    f"bars: <= {SPARED_CLEAN:.0%} good eliminated, AUROC within "
                    f"{CLEAN_MARGIN} of the no-QC run {no_qc:.3f}; good {_caught(r, 'good')}, "
                    f"AUROC {r['auroc']:.3f}; {_cost(r)}")


def findings(result: dict) -> list[str]:
    """Finding 1, then findings 2 to 4 for each criterion the demo ran, in its order."""
    scenarios = result["scenarios"]
    whole, single = scenarios["whole_centers"], scenarios["single_images"]
    lines = [harm_finding(result)]
    lines += [repair_finding(r, result["clean_auroc"]) for r in whole["qc"]]
    lines += [whole_vs_single_finding(w, s) for w, s in zip(whole["qc"], single["qc"])]
    if "clean" in scenarios:
        lines += [clean_cost_finding(r, scenarios["clean"]["no_qc_auroc"])
                  for r in scenarios["clean"]["qc"]]
    return lines


# --- tables, plots and the README ---------------------------------------------------------

def _count(share: float | None, total: int) -> str:
    return f"{round((share or 0) * total)}/{total}"


def detection_row(r: dict) -> dict:
    """One row of detection.csv from a `qc_result`: counts of n images."""
    row = {"criterion": r["criterion"]}
    for kind in ("harmful", "good"):
        for what in ("eliminated", "pending", "flagged"):
            row[f"{kind} {what}"] = _count(r[f"{kind}_{what}"], r[kind])
    row["harmful flagged at least once"] = _count(r["harmful_flagged_ever"], r["harmful"])
    row["per type eliminated"] = ", ".join(f"{k} {v:.0%}" for k, v in
                                           r["per_type_eliminated"].items() if v is not None)
    row["QC s per cycle"] = (None if r["qc_seconds_per_cycle"] is None
                             else round(r["qc_seconds_per_cycle"], 1))
    row["x training cycle"] = (None if r["qc_to_training"] is None
                               else round(r["qc_to_training"], 2))
    return row


def detection_table(result: dict) -> pd.DataFrame:
    """Per scenario and criterion: eliminated, pending and flagged images, and QC's time."""
    return pd.DataFrame([{"scenario": s["title"], **detection_row(r)}
                         for s in result["scenarios"].values() for r in s["qc"]])


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def montage(out: Path, report: Path, types: tuple[str, ...]) -> Path:
    """A good image next to each harmful type made from it."""
    from dqc.harmful import LABEL_TYPES

    good = load_table(out / "cohort" / "test.csv", "inference").iloc[0]
    panels = [("good", good.Path)]
    for kind in types:
        if kind in LABEL_TYPES:
            continue
        path = report / "examples" / f"{kind}.nii.gz"
        if not path.exists():
            make_harmful(good.Path, path, kind, seed=0)
        panels.append((kind, path))
    return plot_montage(panels, report / "harmful_types.png")


def write_plots(stages, scenarios: dict[str, Scenario], report: Path) -> None:
    """Per scenario the test metrics of its runs, per QC run its log; the harmful types;
    the detectability figure."""
    out, c = Path(stages.out), stages.config
    for s, scenario in scenarios.items():
        no_qc = stages.no_qc_run(s)
        runs = {"clean": _metrics(out, "clean"),
                **({} if no_qc == "clean" else {f"dirty {s}": _metrics(out, no_qc)}),
                **{f"QC {s} {k}": _metrics(out, f"qc_{s}_{k}") for k in c.criteria}}
        plot_runs(runs, report / f"test_metrics_{s}.png")
        for k in c.criteria:
            qc = stages.qc_dir(s, k)
            plot_qc_log(pd.read_csv(qc / "qc.csv", keep_default_na=False),
                        pd.read_csv(qc / "qc_images.csv"), report / f"qc_log_{s}_{k}.png",
                        title=f"QC log, scenario {s} ({scenario.title}), criterion {k}")
    montage(out, report, c.types)
    write_bytes(report / "detectability.png",
                (stages.detectability / "detectability.png").read_bytes())


def qc_pages(stages, scenarios: dict[str, Scenario], report: Path) -> list[str]:
    """A link to every QC run's own page (NAME_report.html), and where a browser is found
    a screenshot of scenario A's pages (report/qc_page_A_CRITERION.png)."""
    from dqc.browser import screenshot

    lines = []
    for s in scenarios:
        for k in stages.config.criteria:
            page = stages.run_dir("qc", f"{s}_{k}") / "qc_report.html"
            if not page.is_file():
                continue
            lines.append(f"- [scenario {s}, {k}](../{page.relative_to(stages.out).as_posix()})")
            try:
                shot = screenshot(page, report / f"qc_page_{s}_{k}.png") if s == "A" else None
            except RuntimeError as exc:  # the page is there; its picture is a bonus
                lines[-1] += f" (no screenshot: {exc})"
                continue
            if shot is not None:
                lines[-1] += f" ([screenshot]({shot.name}))"
    return lines


def markdown(stages, scenarios: dict[str, Scenario], result: dict, results: pd.DataFrame,
             detection: pd.DataFrame, pages: list[str]) -> str:
    """The report's README.md; `pages`: the links to each QC run's page (`qc_pages`)."""
    c = stages.config
    first, last = result["finding_cycles"]
    instrument = (stages.detectability / "detectability.md").read_text().split("\n", 1)[1]
    return "\n".join([
        "# Decentralized quality control: demo report",
        "",
        "Souza et al. 2025 (npj Digital Medicine, doi:10.1038/s41746-025-01499-0), reproduced "
        "on the embedded synthetic multi-center cohort (built from the MNI152 template).",
        "",
        "## The findings",
        "",
        f"Criteria run (fixed before the run, each at its default settings): "
        f"{', '.join(f'`{k}`' for k in c.criteria)}; each finding is stated for each. Test "
        f"AUROC: the mean over cycles {first}..{last} (the last {c.finding_cycles}). Flagged "
        "= eliminated + pending.",
        "",
        *findings(result),
        "",
        "## Test-set metrics",
        "",
        "Clean: trained on good data only (scenario C's no-QC run). dirty_TYPE: whole harmful "
        "centers of that type only, no checks (scenario A stands for its type when it is of "
        "one type). dirty_A / dirty_B: scenario A (whole harmful centers) and B (single "
        "harmful images), no checks. qc_S_CRITERION: the same data with quality control (C: "
        "the clean data). Held-out test set (not the QC validation set); the last cycle, and "
        f"the mean AUROC over cycles {first}..{last}.",
        "",
        _markdown(results),
        "",
        "## Detection of harmful images",
        "",
        "Eliminated: harmful twice, R cycles apart. Pending: flagged in the last R cycles, not "
        "yet revisited. Flagged: eliminated + pending. QC s per cycle: the QC run's mean wall "
        "seconds per cycle, and against a cycle of the scenario's no-QC run.",
        "",
        _markdown(detection),
        "",
        "## Detectability of single updates (the pre-trained model)",
        "",
        instrument.strip(),
        "",
        "![detectability](detectability.png)",
        "",
        "## Each QC run's page",
        "",
        "The images each run eliminated or holds for a retry, with their middle slices, "
        "per center, and the check of every update (one self-contained HTML file per run):",
        "",
        *pages,
        "",
        "## Plots",
        "",
        *[f"![test metrics, scenario {s}](test_metrics_{s}.png)\n" for s in scenarios],
        *[f"![QC log, scenario {s}, {k}](qc_log_{s}_{k}.png)\n"
          for s in scenarios for k in c.criteria],
        "![good image and harmful types](harmful_types.png)",
        "",
        "## Settings and timing",
        "",
        "```",
        *[f"{k} = {v}" for k, v in asdict(c).items()],
        *[f"{k}: {v:.0f} s" for k, v in result["stage_seconds"].items()],
        "```",
        "",
    ])


def write_report(stages, scenarios: dict[str, Scenario]) -> Path:
    """OUT/report/README.md, summary.json, tables and PNGs; returns the README's path."""
    report = Path(stages.out) / "report"
    report.mkdir(parents=True, exist_ok=True)
    result = summary(stages, scenarios)
    results = results_table(Path(stages.out), list(stages.runs()),
                            finding_cycles(stages.config))
    detection = detection_table(result)
    write_plots(stages, scenarios, report)
    write_csv(report / "results.csv", results)
    write_csv(report / "detection.csv", detection)
    write_json(report / "summary.json", result)
    path = report / "README.md"
    pages = qc_pages(stages, scenarios, report)
    write_text(path, markdown(stages, scenarios, result, results, detection, pages))
    return path
