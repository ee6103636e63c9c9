"""The demo's report: README.md with results, detection and the three findings; summary.json.

Every figure comes from the run's own files (inference metrics, QC summaries, the
detectability instrument), so the report can be rebuilt from a finished demo folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from dqc.io import write_bytes, write_csv, write_json, write_text
from dqc.data import load_table
from dqc.harmful import make_harmful
from dqc.plots import plot_montage, plot_qc_log, plot_runs

TABLE_METRICS = ("accuracy", "sensitivity", "specificity", "auroc", "f1")
#: The issue's bars for the findings (test AUROC points, fractions of images).
HARM_DROP = 0.05
CLEAN_MARGIN = 0.02
CAUGHT, SPARED = 0.90, 0.05


def _metrics(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "inference" / f"{name}_metrics.csv")


def _auroc(out: Path, name: str, first: int) -> tuple[float, float]:
    """(test AUROC at the last cycle, mean test AUROC over cycles >= first)."""
    m = _metrics(out, name)
    return float(m.loc[m.cycle.idxmax(), "auroc"]), float(m[m.cycle >= first].auroc.mean())


def results_table(out: Path, names: list[str], first: int) -> pd.DataFrame:
    """Test metrics at the last cycle, and the mean AUROC over the continued cycles."""
    rows = []
    for name in names:
        m = _metrics(out, name)
        last = m.loc[m.cycle.idxmax()]
        rows.append({"run": name, "cycle": int(last.cycle),
                     **{k: round(float(last[k]), 3) for k in TABLE_METRICS},
                     f"mean auroc {first}..{int(last.cycle)}":
                         round(float(m[m.cycle >= first].auroc.mean()), 3)})
    return pd.DataFrame(rows)


def _qc_summary(folder: Path) -> dict:
    return json.loads((folder / "qc_summary.json").read_text())


def per_type_detection(folder: Path, scenario_csv: Path) -> dict[str, str]:
    """Eliminated / total per harmful type (and good) in one QC run."""
    images = pd.read_csv(folder / "qc_images.csv", dtype={"Subject": str})
    kinds = pd.read_csv(scenario_csv, dtype={"Subject": str})[["Subject", "HarmfulType"]]
    images = images.merge(kinds, on="Subject", how="left")
    images["kind"] = images.HarmfulType.fillna("").replace("", "good")
    return {kind: f"{int(g.eliminated.sum())}/{len(g)}" for kind, g in images.groupby("kind")}


def detection_row(folder: Path, scenario_csv: Path) -> dict:
    d = _qc_summary(folder)["detection"]
    return {"harmful eliminated": f"{d['harmful_eliminated']}/{d['harmful']}",
            "good eliminated": f"{d['good_eliminated']}/{d['good']}",
            "harmful flagged": f"{round(d['flagged_tpr'] * d['harmful'])}/{d['harmful']}",
            "harmful pending": d["harmful_pending"], "good pending": d["good_pending"],
            "centers identified": f"{d['centers_identified']}/{d['centers_with_harmful']}",
            "per type": ", ".join(f"{k} {v}" for k, v in
                                  per_type_detection(folder, scenario_csv).items())}


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


def _fraction(text: str) -> float:
    done, total = (int(v) for v in text.split("/"))
    return done / total if total else math.nan


def summary(stages, scenarios: dict[str, str]) -> dict:
    """summary.json: clean AUROC; per scenario the dirty AUROC and each criterion's result."""
    out, c = stages.out, stages.config
    first = c.pretrain
    clean, clean_mean = _auroc(out, "clean", first)
    result = {"clean_auroc": clean, "clean_auroc_mean": clean_mean,
              "auroc_cycles": [first, c.cycles - 1],
              "per_type": {}, "scenarios": {}}
    for t in c.types:
        dirty, dirty_mean = _auroc(out, stages.type_run(t), first)
        result["per_type"][t] = {"dirty_auroc": dirty, "dirty_auroc_mean": dirty_mean}
    for s in scenarios:
        dirty, dirty_mean = _auroc(out, f"dirty_{s}", first)
        qc = []
        for criterion in c.criteria:
            folder = stages.run_dir("qc", f"{s}_{criterion}")
            d = _qc_summary(folder)["detection"]
            auroc, auroc_mean = _auroc(out, f"qc_{s}_{criterion}", first)
            qc.append({"criterion": criterion, "params": _qc_summary(folder).get("criterion"),
                       "auroc": auroc, "auroc_mean": auroc_mean,
                       "harmful_eliminated": d["elimination_tpr"],
                       "good_eliminated": d["elimination_fpr"],
                       "harmful_flagged": d["flagged_tpr"],
                       "per_type_eliminated": {
                           k: _fraction(v) for k, v in
                           per_type_detection(folder, stages.scenario_csv(s)).items()}})
        result["scenarios"][_key(scenarios[s])] = {"dirty_auroc": dirty,
                                                   "dirty_auroc_mean": dirty_mean, "qc": qc}
    return result


def _key(title: str) -> str:
    return title.replace("harmful ", "").replace(" ", "_")  # whole_centers, single_images


def _best(qc: list[dict], clean: float) -> dict:
    """The criterion that meets most of the bars, then catches most, then spares most."""
    def score(r: dict) -> tuple:
        bars = (r["harmful_eliminated"] >= CAUGHT, r["good_eliminated"] <= SPARED,
                abs(r["auroc"] - clean) <= CLEAN_MARGIN)
        return sum(bars), r["harmful_eliminated"] - r["good_eliminated"]
    return max(qc, key=score)


def findings(result: dict) -> list[str]:
    """One line per finding of the paper: shown or not, with its numbers."""
    clean = result["clean_auroc"]
    whole, single = (result["scenarios"][k] for k in ("whole_centers", "single_images"))
    drop = clean - whole["dirty_auroc"]
    per_type = ", ".join(f"{t} {v['dirty_auroc']:.3f}" for t, v in result["per_type"].items())
    lines = [
        f"1. Harmful data degrades the travelling model: **{_shown(drop >= HARM_DROP)}**. "
        f"Test AUROC at the last cycle: clean {clean:.3f}, dirty (whole harmful centers) "
        f"{whole['dirty_auroc']:.3f} (drop {drop:+.3f}; bar {HARM_DROP}); single harmful "
        f"images {single['dirty_auroc']:.3f}; per type, whole centers of only that type: "
        f"{per_type}."]
    best = _best(whole["qc"], clean)
    ok = (best["harmful_eliminated"] >= CAUGHT and best["good_eliminated"] <= SPARED
          and abs(best["auroc"] - clean) <= CLEAN_MARGIN)
    rules = "; ".join(f"{r['criterion']}: harmful {r['harmful_eliminated']:.0%} / good "
                      f"{r['good_eliminated']:.0%} eliminated, AUROC {r['auroc']:.3f}"
                      for r in whole["qc"])
    lines.append(
        f"2. Quality control brings the model back to clean: **{_shown(ok)}** (best: "
        f"`{best['criterion']}`; bars: >= {CAUGHT:.0%} harmful and <= {SPARED:.0%} good "
        f"eliminated, AUROC within {CLEAN_MARGIN} of clean {clean:.3f}). Whole centers, {rules}.")
    single_best = next(r for r in single["qc"] if r["criterion"] == best["criterion"])
    more = best["harmful_eliminated"] > single_best["harmful_eliminated"]
    lines.append(
        f"3. Whole harmful centers are found more reliably than single harmful images: "
        f"**{_shown(more)}** (`{best['criterion']}`: {best['harmful_eliminated']:.0%} of the "
        f"whole centers' images eliminated against {single_best['harmful_eliminated']:.0%} of "
        f"the single images; the paper's rule: "
        f"{whole['qc'][0]['harmful_eliminated']:.0%} against "
        f"{single['qc'][0]['harmful_eliminated']:.0%}).")
    return lines


def _shown(flag: bool) -> str:
    return "shown" if flag else "not shown"


def qc_pages(stages, scenarios: dict[str, str], report: Path) -> list[str]:
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


def _copy(source: Path, target: Path) -> None:
    write_bytes(target, source.read_bytes())


def write_report(stages, scenarios: dict[str, str]) -> Path:
    """OUT/report/README.md, summary.json, tables and PNGs; returns the README's path."""
    out, c = Path(stages.out), stages.config
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    names = list(stages.runs())
    results = results_table(out, names, c.pretrain)
    detection = pd.DataFrame(
        [{"scenario": scenarios[s], "criterion": k,
          **detection_row(stages.run_dir("qc", f"{s}_{k}"), stages.scenario_csv(s))}
         for s in scenarios for k in c.criteria])
    for s, title in scenarios.items():
        runs = {"clean": _metrics(out, "clean"), f"dirty {s}": _metrics(out, f"dirty_{s}"),
                **{f"QC {s} {k}": _metrics(out, f"qc_{s}_{k}") for k in c.criteria}}
        plot_runs(runs, report / f"test_metrics_{s}.png")
        for k in c.criteria:
            qc = stages.run_dir("qc", f"{s}_{k}")
            plot_qc_log(pd.read_csv(qc / "qc.csv", keep_default_na=False),
                        pd.read_csv(qc / "qc_images.csv"), report / f"qc_log_{s}_{k}.png",
                        title=f"QC log, scenario {s} ({title}), criterion {k}")
    montage(out, report, c.types)
    det = stages.detectability
    _copy(det / "detectability.png", report / "detectability.png")
    write_csv(report / "results.csv", results)
    write_csv(report / "detection.csv", detection)
    result = summary(stages, scenarios)
    write_json(report / "summary.json", result)
    instrument = (det / "detectability.md").read_text().split("\n", 1)[1].strip()
    settings = {k: str(v) for k, v in asdict(c).items()}
    lines = [
        "# Decentralized quality control: demo report",
        "",
        "Souza et al. 2025 (npj Digital Medicine, doi:10.1038/s41746-025-01499-0), reproduced "
        "on the embedded synthetic multi-center cohort (built from the MNI152 template).",
        "",
        "## The three findings",
        "",
        *findings(result),
        "",
        "## Test-set metrics",
        "",
        "Clean: trained on good data only. dirty_TYPE: whole harmful centers of that type "
        "only, no checks (scenario A stands for its type when it is of one type). dirty_A / dirty_B: scenario A (whole harmful centers) and B (single "
        "harmful images), no checks. qc_S_CRITERION: the same data with quality control. "
        "Held-out test set (not the QC validation set); the last cycle, and the mean AUROC "
        "over the continued cycles (one cycle's AUROC swings by a few points).",
        "",
        _markdown(results),
        "",
        "## Detection of harmful images",
        "",
        "Eliminated: harmful twice, R cycles apart. Pending: flagged in the last R cycles, not "
        "yet revisited. Flagged: harmful at least once.",
        "",
        _markdown(detection),
        "",
        "## Detectability of single updates (the pre-trained model)",
        "",
        instrument,
        "",
        "![detectability](detectability.png)",
        "",
        "## Each QC run's page",
        "",
        "The images each run eliminated or holds for a retry, with their middle slices, "
        "per center, and the check of every update (one self-contained HTML file per run):",
        "",
        *qc_pages(stages, scenarios, report),
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
        *[f"{k} = {v}" for k, v in settings.items()],
        *[f"{k}: {v:.0f} s" for k, v in stages.seconds.items()],
        "```",
        "",
    ]
    path = report / "README.md"
    write_text(path, "\n".join(lines))
    return path
