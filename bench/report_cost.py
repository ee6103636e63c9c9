"""What NAME_report.html costs: its size and the seconds to write it after each cycle, on a
QC run like the demo's scenario A (whole inverted centers, criterion `combined`, 6 cycles,
40x48x40 volumes), with a smaller cohort so that it runs in a few minutes on 2 cores.

    .venv/bin/python bench/report_cost.py --out /tmp/report_cost [--n-train 100]

Prints one line per cycle (wall and CPU seconds to write the page: on a shared machine the
CPU seconds are what it costs alone; its size; images shown) and a summary
with the worst case: the final page re-rendered as if every training image were eliminated
(seconds with the images read for the first time, and again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dqc.cli import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (cohort, models, the run)")
    p.add_argument("--n-train", type=int, default=100, help="training images (the demo: 200)")
    p.add_argument("--n-val", type=int, default=60, help="validation images (the demo: 240)")
    p.add_argument("--centers", type=int, default=10)
    p.add_argument("--qc-cycles", type=int, default=6)
    p.add_argument("--pretrain", type=int, default=6, help="pre-training cycles (the demo: 10)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from dqc.cohort import build_cohort
    from dqc.data import load_table
    from dqc.demo import DemoConfig
    from dqc.harmful import build_scenario
    from dqc.model import Architecture
    from dqc.io import write_text
    from dqc.qc_page import Mosaics, PageData, Reporter, render
    from dqc.qc_report import image_table, log_frame
    from dqc.runs import QCSpec, RunSpec, run_quality_control, train_cycles

    demo, out = DemoConfig(out=Path(args.out)), Path(args.out)
    cohort = build_cohort(out / "cohort", centers=args.centers, n_train=args.n_train,
                          n_val=args.n_val, n_test=4, downsample=demo.downsample,
                          effect=demo.effect, seed=0, verbose=False)
    quiet = dict(verbose=False, echo=lambda line: None)
    pre, models = args.pretrain, out / f"pre{args.pretrain}"
    if not (models / f"tm_encoder_{pre - 1:03d}.keras").is_file():
        train_cycles(RunSpec(train_csv=str(cohort["train"]), out=str(models), prefix="tm",
                             cycles=range(0, pre), seed=40, arch=Architecture(width=demo.width),
                             **quiet))
    sizes = pd.read_csv(cohort["train"], dtype={"Study": str}).Study.value_counts()
    harmful = sorted(sizes.index, key=lambda c: (-sizes[c], c))[1:1 + demo.whole_centers]
    scenario = build_scenario(cohort["train"], out / "scenario_A", centers=harmful,
                              types=list(demo.whole_types), seed=0, verbose=False)
    spec = RunSpec(train_csv=str(scenario), out=str(out / "qc"), prefix="qc",
                   cycles=range(pre, pre + args.qc_cycles), seed=42,
                   encoder=str(models / f"tm_encoder_{pre - 1:03d}.keras"),
                   classifier=str(models / f"tm_classifier_{pre - 1:03d}.keras"), **quiet)
    qspec = QCSpec(val_csv=str(cohort["val"]), error=demo.loss_tolerance, revisit=demo.revisit,
                   criterion="combined", report=False)  # the page is written by `timed`
    reporter = Reporter(spec, qspec, load_table(scenario, "train"))
    rows = []

    def timed(policy, cycle: int) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        reporter(policy, cycle)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        shown = sum(policy.status(s) != "kept" for s in policy.state.images)
        rows.append({"cycle": cycle, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                     "bytes": reporter.path.stat().st_size, "images_shown": shown})
        print(json.dumps(rows[-1]), flush=True)

    policy = run_quality_control(spec, qspec, on_cycle=timed)
    # the worst case: the same page with every training image eliminated, each image read
    # for the first time (cold) and again (warm: the run's later cycles)
    images = image_table(policy, reporter.train)
    images["status"], images["eliminated"] = "eliminated", 1
    images["eliminated_cycle"] = images.eliminated_cycle.fillna(spec.cycles.stop - 1)
    data = PageData("worst case", log_frame(policy), images, reporter.settings,
                    reporter.criterion, reporter.planned, {},
                    Mosaics(dict(zip(reporter.train.Subject, reporter.train.Path))))
    worst_page, seconds = out / "worst_case_report.html", []
    for _ in range(2):
        start, cpu = time.perf_counter(), time.process_time()
        write_text(worst_page, render(data, spec.cycles.stop - 1))
        seconds.append([round(time.perf_counter() - start, 3), round(time.process_time() - cpu, 3)])
    print(json.dumps({"cycles": len(rows), "max_seconds": max(r["seconds"] for r in rows),
                      "mean_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 3),
                      "max_cpu_seconds": max(r["cpu_seconds"] for r in rows),
                      "final_bytes": rows[-1]["bytes"], "images_shown": rows[-1]["images_shown"],
                      "training_images": len(images),
                      "all_eliminated_bytes": worst_page.stat().st_size,
                      "all_eliminated_seconds_and_cpu_cold_warm": seconds,
                      "page": str(reporter.path)}))


if __name__ == "__main__":
    run_main(main)
