"""The demo's QC measurement on a few scenarios and criteria, per cohort seed, in one table.

    python bench/qc_seeds.py --out qc_seeds --seeds 1,2,3,4 --criteria witnessed --scenarios A,C

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
import json
from pathlib import Path

import pandas as pd

from dqc.runtime import quiet_tensorflow_import

quiet_tensorflow_import()

from dqc import checkpoint  # noqa: E402  (TensorFlow, quiet)
from dqc.demo import DemoConfig, Stages, without_harm  # noqa: E402
from dqc.inference import (find_cycle_models, output_paths, predict_cycles,  # noqa: E402
                           write_outputs)
from dqc.io import write_csv  # noqa: E402


def test_auroc(stages: Stages, run: str) -> float:
    """The run's mean test AUROC over the demo's last `finding_cycles` cycles."""
    c = stages.config
    metrics = pd.read_csv(stages.out / "inference" / f"{run}_metrics.csv")
    return float(metrics[metrics.cycle >= c.cycles - c.finding_cycles].auroc.mean())


def seconds_per_cycle(folder: Path, first: int) -> float:
    seconds = [v for k, v in json.loads((folder / "cycle_seconds.json").read_text()).items()
               if int(k) >= first]
    return sum(seconds) / len(seconds)


def run_seed(seed: int, out: Path, criteria: tuple[str, ...], scenarios: tuple[str, ...]
             ) -> list[dict]:
    """Train, check and score one seed's runs; one row per scenario and criterion."""
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
    folders = st.runs()
    last = range(c.cycles - c.finding_cycles, c.cycles)
    for run in runs:
        folder, prefix = folders[run]

        def infer(run=run, folder=folder, prefix=prefix) -> None:
            models = find_cycle_models(folder, folder, prefix=prefix, cycles=last)
            metrics, predictions = predict_cycles(st.cohort / "test.csv", models, verbose=False)
            write_outputs(metrics, predictions, output_paths(st.out / "inference", run))
        st.stage(f"inference {run}", (st.out / "inference" / f"{run}_metrics.csv").is_file(),
                 infer)
    rows, clean = [], test_auroc(st, "clean")
    for s in scenarios:
        no_qc = st.no_qc_run(s)
        training = seconds_per_cycle(folders[no_qc][0], c.pretrain)
        for k in criteria:
            images = pd.read_csv(st.qc_dir(s, k) / "qc_images.csv")
            row = {"seed": seed, "scenario": s, "criterion": k}
            for kind, part in (("harmful", images[images.Harmful == 1]),
                               ("good", images[images.Harmful == 0])):
                row[f"{kind} eliminated"] = f"{(part.status == 'eliminated').sum()}/{len(part)}"
                row[f"{kind} flagged"] = f"{(part.status != 'kept').sum()}/{len(part)}"
            qc = seconds_per_cycle(st.qc_dir(s, k), c.pretrain)
            row.update({"test AUROC": round(test_auroc(st, f"qc_{s}_{k}"), 3),
                        "no QC": round(test_auroc(st, no_qc), 3), "clean": round(clean, 3),
                        "QC s/cycle": round(qc, 1), "training s/cycle": round(training, 1),
                        "QC / training": round(qc / training, 2)})
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="qc_seeds", help="folder: one demo folder per seed")
    p.add_argument("--seeds", default="1,2,3,4", help="cohort seeds, comma-separated")
    p.add_argument("--criteria", default="witnessed", help="QC criteria, comma-separated")
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
