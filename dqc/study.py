"""The study over cohort seeds: the demo's scenarios for several seeds, one table and one plot.

    python -m dqc.study --out study_out              # the untuned seeds (UNTUNED_SEEDS)
    python -m dqc.study --out study_quick --quick --seeds 1,2 --tuning-seeds 1

A benchmark, not a test: each seed is a whole demo (`dqc.demo.Stages`) in OUT/seed_N, with the
criteria of `dqc.demo.RULES` (the paper's rule and the recommended criterion, at their default
settings) on scenarios A (whole harmful centers), B (single harmful images) and C (no harmful
image). The cohort seed draws the centers (sizes, PD rates, scanner signatures), the subjects,
and the scenarios' picks (scenario A's centers are the 2nd and 3rd largest of that cohort; B's
receiving centers and donor images, and every harmful image's noise, follow the seed). Each
seed's demo folder is reused, stage by stage, so an interrupted study continues.

Writes OUT/study_seeds.csv (one row per seed, scenario and criterion), OUT/study.csv and
OUT/study.md (mean and range over the untuned seeds; the tuning seeds apart) and
OUT/study.png. See docs/study.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from dqc.cli import Parser, run_main
from dqc.demo import QUICK, RULES, DemoConfig, Stages, add_variant_flags, check_config
from dqc.errors import DQCError
from dqc.io import write_csv, write_text

#: The seeds whose runs may inform settings, and the seeds the table reports (untuned). Seeds
#: 1 and 2 informed the choice of `anchored`, 3-5 had been seen before it, 6-8, its untuned
#: seeds, informed z = 4, 9-11, z = 4's untuned seeds, its revert, and 1-11 the choice of
#: `balanced` (docs/method.md, docs/study.md), 12-14 were its untuned seeds (15 ran beside
#: them), 1-15 informed `abstaining`, 16-18, its untuned seeds, informed `pooled` (and
#: `stratified`, not chosen). 19-21, `pooled`'s untuned seeds, informed its borrowing rule
#: (seed 20: the label the batch lacks, not the one the kept images lack). 22-24, its
#: corrected rule's untuned seeds, and 16-24 informed `centered`; 25-27, `centered`'s untuned
#: seeds, withdrew it (seed 25: a harmful center's accepted batch raised its own floor).
#: 28-30 were `pooled`'s untuned seeds with lone images judged (2026-12-08). 31-33 have never
#: been drawn.
TUNING_SEEDS = tuple(range(1, 31))
UNTUNED_SEEDS = (31, 32, 33)
#: The criteria each seed runs, each at its defaults: the demo's (the paper's rule and the
#: recommended criterion) and `centered`, recommended for a day and withdrawn, for the record.
CRITERIA = (*RULES, "centered")
#: The table's figures of a QC run (keys of the demo's summary.json) and their labels.
METRICS = {"harmful_eliminated": "harmful eliminated",
           "harmful_flagged": "harmful flagged",
           "good_eliminated": "good eliminated",
           "good_flagged": "good flagged",
           "auroc_minus_clean": "test AUROC - clean",
           "qc_seconds_per_cycle": "QC s per cycle",
           "qc_to_training": "QC cycle / training cycle"}
#: The figures the plot shows, one panel each.
PLOTTED = ("harmful_eliminated", "harmful_flagged", "good_eliminated", "auroc_minus_clean",
           "qc_to_training")
#: How a figure is written in study.md: fractions of images as percentages.
PERCENT = ("harmful_eliminated", "harmful_flagged", "good_eliminated", "good_flagged")


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def seed_summary(out: Path, seed: int) -> dict:
    """The summary.json of one seed's demo report."""
    return json.loads((seed_folder(out, seed) / "report" / "summary.json").read_text())


def seed_rows(summary: dict, seed: int, tuning: bool) -> list[dict]:
    """One row per scenario and criterion of one seed's summary.json."""
    rows = []
    for scenario in summary["scenarios"].values():
        for r in scenario["qc"]:
            rows.append({"seed": seed, "tuning": tuning, "scenario": scenario["scenario"],
                         "title": scenario["title"], "criterion": r["criterion"],
                         **{m: r.get(m) for m in METRICS}})
    return rows


def collect_rows(out: Path, seeds: Sequence[int], tuning: set[int]) -> pd.DataFrame:
    """Every seed's rows, from the demo reports in `out` (`seed_rows`)."""
    return pd.DataFrame([row for seed in seeds
                         for row in seed_rows(seed_summary(out, seed), seed, seed in tuning)])


def study_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max of each figure over the seeds in `rows`, per scenario and criterion
    (in the order met); `seeds` lists them."""
    table = []
    groups = rows.groupby(["scenario", "criterion"], sort=False)
    for (scenario, criterion), group in groups:
        row = {"scenario": scenario, "title": group.title.iloc[0], "criterion": criterion,
               "seeds": ",".join(str(s) for s in sorted(group.seed))}
        for m in METRICS:
            values = pd.to_numeric(group[m], errors="coerce").dropna()
            for stat in ("mean", "min", "max"):
                row[f"{m}_{stat}"] = float(getattr(values, stat)()) if len(values) else None
        table.append(row)
    return pd.DataFrame(table)


def _cell(row: pd.Series, metric: str) -> str:
    """'mean [min, max]'; percentages for fractions of images, 3 decimals for AUROC."""
    mean, low, high = (row[f"{metric}_{s}"] for s in ("mean", "min", "max"))
    if mean is None or pd.isna(mean):
        return "n/a"
    if metric in PERCENT:
        return f"{mean:.1%} [{low:.1%}, {high:.1%}]"
    if metric == "auroc_minus_clean":
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def table_markdown(table: pd.DataFrame) -> str:
    """The study table as markdown: a row per scenario and criterion, a column per figure."""
    columns = ["scenario", "criterion", "seeds", *METRICS.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [f"{row.scenario} ({row.title})", f"`{row.criterion}`", row.seeds,
                 *[_cell(row, m) for m in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_markdown(untuned: pd.DataFrame, tuning: pd.DataFrame, untuned_seeds: Sequence[int],
                   tuning_seeds: Sequence[int]) -> str:
    """study.md: the untuned seeds' table first, then the tuning seeds'."""
    parts = ["# Quality control over cohort seeds", "",
             "Each cell: mean [min, max] over the seeds. Flagged = eliminated + pending. Test "
             "AUROC - clean: the mean test AUROC over the demo's last cycles, minus the clean "
             "run's (scenario C: minus its no-QC run, which is the clean run). QC cycle / "
             "training cycle: the QC run's mean wall seconds per cycle over its scenario's "
             "no-QC run's.", "",
             f"## Untuned seeds ({', '.join(map(str, untuned_seeds))})", "",
             table_markdown(untuned) if len(untuned) else "(none run)", ""]
    if len(tuning):
        parts += [f"## Tuning seeds ({', '.join(map(str, tuning_seeds))}): settings may have "
                  "been chosen on these", "", table_markdown(tuning), ""]
    parts += ["![study](study.png)", ""]
    return "\n".join(parts)


def write_study(rows: pd.DataFrame, out: Path, untuned_seeds: Sequence[int],
                tuning_seeds: Sequence[int]) -> Path:
    """study_seeds.csv, study.csv (untuned seeds), study.md and study.png in `out`."""
    from dqc.plots import plot_study

    out = Path(out)
    untuned = study_table(rows[~rows.tuning]) if (~rows.tuning).any() else pd.DataFrame()
    tuning = study_table(rows[rows.tuning]) if rows.tuning.any() else pd.DataFrame()
    write_csv(out / "study_seeds.csv", rows)
    write_csv(out / "study.csv", untuned)
    plot_study(rows, {m: METRICS[m] for m in PLOTTED}, out / "study.png")
    path = out / "study.md"
    write_text(path, study_markdown(untuned, tuning, untuned_seeds, tuning_seeds))
    return path


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DQCError(f"seeds must be comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise DQCError(f"seeds must be >= 0, got {text!r}")
    return seeds


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="study_out", help="folder of the study (a demo folder "
                   "per seed, the table, the plot)")
    p.add_argument("--seeds", default=",".join(map(str, UNTUNED_SEEDS)),
                   help="cohort seeds to run, comma-separated (default: the untuned seeds; "
                   f"the tuning seeds are {','.join(map(str, TUNING_SEEDS))})")
    p.add_argument("--tuning-seeds", default=",".join(map(str, TUNING_SEEDS)),
                   help="the seeds settings were tuned on: reported apart from the others")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="QC criteria, each at its "
                   "defaults, comma-separated (default: the paper's rule, the recommended "
                   f"criterion and one run for the record: {','.join(CRITERIA)}); every "
                   "seed runs all of "
                   "them and the table has a row for each")
    add_variant_flags(p)  # each seed's demo in that variant
    return p.parse_args(argv)


def seed_configs(args) -> list[DemoConfig]:
    """Each seed's demo settings, every one checked before the first seed runs."""
    seeds = _seeds(args.seeds)
    if not seeds:
        raise DQCError("--seeds: no seed given")
    base = replace(DemoConfig(out=Path(args.out)), **(QUICK if args.quick else {}),
                   verbose=not args.quiet,
                   criteria=tuple(k.strip() for k in args.criteria.split(",") if k.strip()))
    configs = [replace(base, out=seed_folder(args.out, seed), seed=seed) for seed in seeds]
    for config in configs:
        check_config(config)
    return configs


def main(argv=None):
    args = parse_args(argv)
    configs, tuned = seed_configs(args), set(_seeds(args.tuning_seeds))
    seeds = [c.seed for c in configs]
    for config in configs:
        start = time.perf_counter()
        print(f"[study] seed {config.seed}{' (tuning)' if config.seed in tuned else ''}: "
              f"{config.out}", flush=True)
        Stages(config).run()
        print(f"[study] seed {config.seed}: {time.perf_counter() - start:.0f} s", flush=True)
    path = write_study(collect_rows(Path(args.out), seeds, tuned), Path(args.out),
                       [s for s in seeds if s not in tuned], [s for s in seeds if s in tuned])
    print(f"[study] table: {path}")


if __name__ == "__main__":
    run_main(main)
