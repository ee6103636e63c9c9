"""The demo's report: a README.md with the results table, detection figures and plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from dqc.checkpoint import write_text
from dqc.data import load_table
from dqc.harmful import make_harmful
from dqc.plots import plot_montage, plot_qc_log, plot_runs

TABLE_METRICS = ("accuracy", "sensitivity", "specificity", "auroc", "f1")


def _metrics(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "inference" / f"{name}_metrics.csv")


def results_table(out: Path, scenarios: dict[str, str]) -> pd.DataFrame:
    """Test metrics at the last cycle: clean, and dirty / QC per scenario."""
    rows = []
    names = ["clean"] + [f"{kind}_{s}" for s in scenarios for kind in ("dirty", "qc")]
    for name in names:
        m = _metrics(out, name)
        last = m.loc[m.cycle.idxmax()]
        kind, _, scenario = name.partition("_")
        rows.append({"scenario": scenarios.get(scenario, "-") if scenario else "-",
                     "run": kind, "cycle": int(last.cycle),
                     **{k: round(float(last[k]), 3) for k in TABLE_METRICS}})
    return pd.DataFrame(rows)


def detection_table(out: Path, scenarios: dict[str, str]) -> pd.DataFrame:
    """Per scenario: harmful and good images eliminated, pending, centers identified."""
    rows = []
    for s, title in scenarios.items():
        d = json.loads((out / f"qc_{s}" / "qc_summary.json").read_text())["detection"]
        rows.append({"scenario": title,
                     "harmful eliminated": f"{d['harmful_eliminated']}/{d['harmful']}",
                     "harmful pending": d["harmful_pending"],
                     "harmful flagged": f"{round(d['flagged_tpr'] * d['harmful'])}/{d['harmful']}",
                     "good eliminated": f"{d['good_eliminated']}/{d['good']}",
                     "good pending": d["good_pending"],
                     "centers identified": f"{d['centers_identified']}/{d['centers_with_harmful']}",
                     "cycles flag to elimination": d["mean_cycles_to_elimination"]})
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def montage(out: Path, report: Path, scenarios: dict[str, str]) -> Path:
    """A good image next to each harmful type made from it."""
    from dqc.harmful import HARMFUL_TYPES

    good = load_table(out / "cohort" / "test.csv", "inference").iloc[0]
    examples = report / "examples"
    panels = [("good", good.Path)]
    for kind in HARMFUL_TYPES:
        if kind == "label":
            continue
        path = examples / f"{kind}.nii.gz"
        if not path.exists():
            make_harmful(good.Path, path, kind, seed=0)
        panels.append((kind, path))
    return plot_montage(panels, report / "harmful_types.png")


def write_report(out: Path, config, scenarios: dict[str, str], seconds: dict[str, float]) -> Path:
    """OUT/report/README.md with tables and PNGs; returns its path."""
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    results = results_table(out, scenarios)
    detection = detection_table(out, scenarios)
    for s, title in scenarios.items():
        runs = {"clean": _metrics(out, "clean"), f"dirty {s}": _metrics(out, f"dirty_{s}"),
                f"QC {s}": _metrics(out, f"qc_{s}")}
        plot_runs(runs, report / f"test_metrics_{s}.png")
        qc = out / f"qc_{s}"
        plot_qc_log(pd.read_csv(qc / "qc.csv", keep_default_na=False),
                    pd.read_csv(qc / "qc_images.csv"), report / f"qc_log_{s}.png",
                    title=f"QC log, scenario {s} ({title})")
    montage(out, report, scenarios)
    results.to_csv(report / "results.csv", index=False)
    detection.to_csv(report / "detection.csv", index=False)
    settings = {k: str(v) for k, v in asdict(config).items()}
    lines = [
        "# Decentralized quality control: demo report",
        "",
        "Souza et al. 2025 (npj Digital Medicine, doi:10.1038/s41746-025-01499-0), reproduced "
        "on the embedded synthetic multi-center cohort (built from the MNI152 template).",
        "",
        "## Test-set metrics at the last cycle",
        "",
        "Clean: trained on good data only. Dirty: continued from the pre-trained model on data "
        "with harmful images, no checks. QC: the same, with verification, revisit and "
        "elimination. Held-out test set (not the QC validation set).",
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
        "## Plots",
        "",
        *[f"![test metrics, scenario {s}](test_metrics_{s}.png)\n\n"
          f"![QC log, scenario {s}](qc_log_{s}.png)\n" for s in scenarios],
        "![good image and harmful types](harmful_types.png)",
        "",
        "## Settings and timing",
        "",
        "```",
        *[f"{k} = {v}" for k, v in settings.items()],
        *[f"{k}: {v:.0f} s" for k, v in seconds.items()],
        "```",
        "",
    ]
    path = report / "README.md"
    write_text(path, "\n".join(lines))
    return path
