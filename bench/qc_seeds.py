"""The demo's QC measurement on a few scenarios and criteria, per cohort seed, in one table.

    python bench/qc_seeds.py --out qc_seeds --seeds 1,2 --criteria anchored --scenarios A,C

A benchmark, not a test, and the cheap part of `make study` (docs/study.md): for each seed it
runs the demo's stages (`dqc.demo.Stages`, full-size settings, each stage reused when done)
for the cohort, the clean run, the chosen scenarios' dirty baselines and QC runs (each
criterion at its defaults), and scores only the last `finding_cycles` cycles of each run on
the test set (all the findings use). It skips what the study adds: the detectability
instrument, scenario B unless asked, and the paper's rule, whose validation passes cost most
on a slow CPU. Prints the table and writes OUT/qc_seeds.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from dqc.runtime import quiet_tensorflow_import

quiet_tensorflow_import()

from dqc import checkpoint, defaults  # noqa: E402  (TensorFlow, quiet)
from dqc.demo import DemoConfig, Stages, without_harm  # noqa: E402
from dqc.io import write_csv  # noqa: E402
from dqc.report import auroc, detection_row, finding_cycles, mean_seconds, qc_result  # noqa


def run_seed(seed: int, out: Path, criteria: tuple[str, ...], scenarios: tuple[str, ...]
             ) -> list[dict]:
    """Train, check and score one seed's runs; one row per scenario and criterion (the
    figures of the demo's report: `dqc.report.qc_result`)."""
    c = DemoConfig(out=out / f"seed_{seed}", seed=seed, criteria=criteria, verbose=False)
    st = Stages(c)
    st.stage("cohort", (st.cohort / "test.csv").is_file(), st.build_cohort)
    st.stage("clean travelling model",
             checkpoint.last_complete_cycle(st.run_dir("clean"), "tm") == c.cycles - 1,
             st.train_clean)
    runs = ["clean"]
    for s in scenarios:
        st._dirty(s)
        runs += [] if without_harm(s) else [f"dirty_{s}"]
        for k in criteria:
            st.stage(f"quality control {s} ({k})",
                     (st.qc_dir(s, k) / "qc_summary.json").is_file(),
                     lambda s=s, k=k: st.quality_control(s, k))
            runs.append(f"qc_{s}_{k}")
    folders, cycles = st.runs(), finding_cycles(c)
    for run in runs:
        st.score(run, *folders[run], cycles=cycles)
    rows, clean = [], auroc(st.out, "clean", cycles)[0]
    for s in scenarios:
        no_qc = st.no_qc_run(s)
        training = mean_seconds(folders[no_qc][0], range(c.pretrain, c.cycles))
        for k in criteria:
            r = qc_result(st, s, k, clean, training)
            row = detection_row(r)
            rows.append({"seed": seed, "scenario": s, **{key: row[key] for key in (
                "criterion", "harmful eliminated", "harmful flagged", "good eliminated",
                "good flagged")},
                "test AUROC": round(r["auroc"], 3),
                "no QC": round(auroc(st.out, no_qc, cycles)[0], 3), "clean": round(clean, 3),
                "QC s/cycle": row["QC s per cycle"], "training s/cycle": round(training, 1),
                "QC / training": row["x training cycle"]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="qc_seeds", help="folder: one demo folder per seed")
    p.add_argument("--seeds", default="1,2,3,4", help="cohort seeds, comma-separated")
    p.add_argument("--criteria", default=defaults.RECOMMENDED_CRITERION,
                   help="QC criteria, comma-separated (default: the recommended one)")
    p.add_argument("--scenarios", default="A,C", help="demo scenarios (A, B, C)")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = [row for seed in args.seeds.split(",")
            for row in run_seed(int(seed), out, tuple(args.criteria.split(",")),
                                tuple(args.scenarios.split(",")))]
    table = pd.DataFrame(rows)
    write_csv(out / "qc_seeds.csv", table)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
